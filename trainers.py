"""Loss math and trainers for SFT, TDPO (Zeng et al., ICML 2024, arXiv 2404.11999), DPO and IPO.

Read top to bottom: first the pure functions of tensors (each tested against a naive
implementation of its equation in tests/test_losses.py), then `concatenated_forward`, the one
forward pass every loss and trainer uses, then `BasicTrainer`, the whole single-process run.
Distributed trainers subclass BasicTrainer and override only its named hooks.
"""
import contextlib
import json
import math
import os
import random
import signal
import time
from collections import defaultdict
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

import lora
import preference_datasets
import token_stats
import utils

# ----------------------------------------------------------------------------------------------
# Loss math: pure functions of tensors. B = sequences, T = tokens, V = vocabulary.
# ----------------------------------------------------------------------------------------------


def _shift_labels(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels (B, T) with -100 on prompt and padding -> (targets (B, T-1) with 0 at masked
    positions, float mask (B, T-1)). Logit t predicts token t+1."""
    labels = labels[:, 1:]
    mask = labels != -100
    return labels.masked_fill(~mask, 0), mask


def _masked_sum(values: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum (or mean) over the T axis of `values` where `mask`; a row with no tokens gives 0, not NaN."""
    total = (values * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def _get_batch_logps(logits: torch.Tensor, labels: torch.Tensor, average_log_prob: bool = False) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over response tokens (DPO paper, Eq. 7 inputs).

    logits (B, T, V), labels (B, T) with -100 where not a response token -> (B,).
    """
    assert logits.shape[:-1] == labels.shape, (logits.shape, labels.shape)
    targets, mask = _shift_labels(labels)
    logps = logits[:, :-1].float().log_softmax(-1)
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return _masked_sum(token_logps, mask, average_log_prob)


def _tdpo_get_batch_logps(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor,
                          average_log_prob: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence TDPO statistics, with the reference implementation's arguments and returns.

    logits, reference_logits (B, T, V) of policy πθ and reference π_ref; labels (B, T).
    Returns three (B,) tensors, sums over response tokens t (means if average_log_prob):
      logps_margin = Σ_t log πθ(y_t|x,y_<t) − log π_ref(y_t|x,y_<t)                  (Eq. 18, u)
      position_kl  = Σ_t KL(π_ref(·|x,y_<t) ‖ πθ(·|x,y_<t)) over the full vocabulary (SeqKL, Eq. 14)
      logps        = Σ_t log πθ(y_t|x,y_<t)
    Both sides use log_softmax: the reference's softmax().log() gives −inf·0 = NaN on underflow.
    """
    assert logits.shape == reference_logits.shape and logits.shape[:-1] == labels.shape
    targets, mask = _shift_labels(labels)
    logps = logits[:, :-1].float().log_softmax(-1)
    reference_logps = reference_logits[:, :-1].float().log_softmax(-1)
    position_kl = (reference_logps.exp() * (reference_logps - logps)).sum(-1)
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    reference_token_logps = reference_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (_masked_sum(token_logps - reference_token_logps, mask, average_log_prob),
            _masked_sum(position_kl, mask, average_log_prob),
            _masked_sum(token_logps, mask, average_log_prob))


def tdpo_loss(chosen_logps_margin: torch.Tensor, rejected_logps_margin: torch.Tensor,
              chosen_position_kl: torch.Tensor, rejected_position_kl: torch.Tensor,
              beta: float, alpha: float = 0.5, if_tdpo2: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDPO losses for B pairs (all inputs (B,), from `_tdpo_get_batch_logps`).

    u = logps_margin_w − logps_margin_l, δ = SeqKL_l − SeqKL_w.
      TDPO1 (Eq. 18): −log σ(β(u − δ))
      TDPO2 (Eq. 20): −log σ(β(u − α(SeqKL_l − sg(SeqKL_w))))
    Returns (losses, chosen_rewards, rejected_rewards), rewards = β·(logps_margin + position_kl)
    detached, as the reference logs them.
    """
    margin = chosen_logps_margin - rejected_logps_margin
    if if_tdpo2:
        logits = margin - alpha * (rejected_position_kl - chosen_position_kl.detach())
    else:
        logits = margin - (rejected_position_kl - chosen_position_kl)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (chosen_logps_margin + chosen_position_kl).detach()
    rejected_rewards = beta * (rejected_logps_margin + rejected_position_kl).detach()
    return losses, chosen_rewards, rejected_rewards


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                    beta: float, label_smoothing: float = 0.0, ipo: bool = False,
                    reference_free: bool = False, divergence: str = 'reverse_kl'
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, Eq. 7), conservative DPO (label_smoothing), IPO (Azar et al. 2023,
    Eq. 17) and f-DPO (Wang et al. 2023) on (B,) sequence log-probs.

    f-DPO's implicit reward is β·f'(πθ/π_ref) for the f-divergence constraint: reverse_kl (f'(u) =
    log u + 1, which is DPO) or forward_kl (f'(u) = −1/u, reward −β·π_ref/πθ). The loss is
    −log σ(r_w − r_l). reference_free drops π_ref from the loss (not from the logged rewards).
    Returns (losses, chosen_rewards, rejected_rewards), rewards detached."""
    def f_prime(log_ratio):  # f'(u) at u = πθ/π_ref, without additive constants (they cancel in r_w − r_l)
        return log_ratio if divergence == 'reverse_kl' else -torch.exp(-log_ratio)
    if divergence not in ('reverse_kl', 'forward_kl'):
        raise ValueError(f'divergence={divergence!r}; valid: reverse_kl, forward_kl')
    if divergence == 'forward_kl' and (ipo or reference_free):
        raise ValueError('divergence=forward_kl is f-DPO: it needs the reference and the logistic loss')
    chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    if reference_free:
        logits = policy_chosen_logps - policy_rejected_logps
    else:
        logits = f_prime(chosen_log_ratio) - f_prime(rejected_log_ratio)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    return losses, beta * f_prime(chosen_log_ratio).detach(), beta * f_prime(rejected_log_ratio).detach()


class SequenceStats(NamedTuple):
    """Per-sequence statistics (each (B,)) that every preference loss and metric is built from."""
    logps_margin: torch.Tensor  # Σ_t log πθ − log π_ref of the taken tokens
    position_kl: torch.Tensor   # SeqKL: Σ_t KL(π_ref ‖ πθ) over the vocabulary
    logps: torch.Tensor         # Σ_t log πθ of the taken tokens


PreferenceLoss = Callable[[SequenceStats, SequenceStats], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def build_preference_loss(loss_config: DictConfig) -> PreferenceLoss:
    """Decide the loss once: (chosen stats, rejected stats) -> (losses, chosen_rewards, rejected_rewards)."""
    c = loss_config
    if c.name == 'tdpo':
        return lambda w, l: tdpo_loss(w.logps_margin, l.logps_margin, w.position_kl, l.position_kl,
                                      beta=c.beta, alpha=c.alpha, if_tdpo2=c.if_tdpo2)
    if c.name in ('dpo', 'ipo'):
        ipo, smoothing = c.name == 'ipo', c.get('label_smoothing', 0.0)
        reference_free, divergence = c.get('reference_free', False), c.get('divergence', 'reverse_kl')
        return lambda w, l: preference_loss(w.logps, l.logps, w.logps - w.logps_margin, l.logps - l.logps_margin,
                                            beta=c.beta, label_smoothing=smoothing, ipo=ipo,
                                            reference_free=reference_free, divergence=divergence)
    raise ValueError(f"unknown loss.name={c.name!r}; valid: sft, tdpo, dpo, ipo")


def concatenated_inputs(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Stack chosen (first B rows) and rejected (last B rows), right-padded to one length, so that
    policy and reference each see both in a single forward pass."""
    length = max(batch['chosen_input_ids'].shape[1], batch['rejected_input_ids'].shape[1])
    out = {}
    for key, pad in (('input_ids', 0), ('attention_mask', 0), ('labels', -100)):
        out[f'concatenated_{key}'] = torch.cat([utils.pad_to_length(batch[f'chosen_{key}'], length, pad),
                                                utils.pad_to_length(batch[f'rejected_{key}'], length, pad)])
    return out


# ----------------------------------------------------------------------------------------------
# Trainers
# ----------------------------------------------------------------------------------------------

class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint; rerun with resume=true."""


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates; the last good state was checkpointed."""


class BasicTrainer:
    """Single process: one device, or one model split over all local GPUs (device_map='balanced').

    Subclasses change behaviour only through the hooks: `wrap_models`, `clip_gradient`,
    `policy_state_dict`, `load_policy_state_dict`, `generate`, `save`, `load_training_state`, and the class
    attributes below. `reference_forward` is where the reference runs: a frozen copy, or with LoRA the
    policy with its adapters disabled.
    """
    # train.py starts one process per GPU (or torchrun does) for a distributed trainer, else one process
    distributed = False
    # the fused statistics call the decoder and read the output weight directly, outside the model's forward
    can_fuse_stats = True
    # the ranks split each batch between them (data parallel); tensor-parallel ranks all see the whole batch
    splits_batches = True
    # trains a LoRA policy (lora.r set; see lora.py)
    supports_lora = True

    def __init__(self, policy, config: DictConfig, seed: int, run_dir: str, reference_model=None,
                 rank: int = 0, world_size: int = 1):
        self.config, self.seed, self.run_dir = config, seed, run_dir
        self.rank, self.world_size = rank, world_size
        self.data_rank, self.data_world_size = (rank, world_size) if self.splits_batches else (0, 1)
        self.is_sft = config.loss.name == 'sft'
        self.preference_loss = None if self.is_sft else build_preference_loss(config.loss)
        cache_dir = utils.get_local_dir(config.local_dirs)
        self.tokenizer = utils.load_tokenizer(config.model, cache_dir)
        data = dict(tokenizer=self.tokenizer, max_length=config.max_length, max_prompt_length=config.max_prompt_length,
                    sft_mode=self.is_sft, cache_dir=cache_dir, silent=rank != 0, on_bad_example=config.on_bad_example)
        # Local files hold out eval_fraction of their prompts, unless eval data is named: then the
        # training files are used whole, and so are the named eval files.
        held_out = config.eval_fraction if not config.eval_datasets else 0.0
        self.train_examples = preference_datasets.load_examples(config.datasets, split='train', eval_fraction=held_out, **data)
        self.eval_examples = []
        if config.n_eval_examples:
            eval_examples = preference_datasets.load_examples(config.eval_datasets or config.datasets, split='test',
                                                              eval_fraction=1.0 if config.eval_datasets else held_out, **data)
            random.Random(seed).shuffle(eval_examples)
            n_eval = min(config.n_eval_examples, len(eval_examples))
            self.eval_examples = eval_examples[:n_eval - n_eval % self.data_world_size]  # equal slices per rank
        utils.rank0_print(f'{len(self.train_examples)} train and {len(self.eval_examples)} eval examples')

        self.policy, self.reference_model = self.wrap_models(policy, reference_model)
        self.stats_impl = config.stats_impl
        if self.stats_impl == 'fused' and (not self.can_fuse_stats or token_stats.output_head(self.policy) is None):
            utils.rank0_print(f"stats_impl=fused: not with this model's output layer under {type(self).__name__}; "
                              f"using 'chunked'")
            self.stats_impl = 'chunked'
        optimizers = ('RMSprop', 'AdamW', 'Adam', 'SGD')
        if config.optimizer not in optimizers:
            raise ValueError(f'unknown optimizer={config.optimizer!r}; valid: {", ".join(optimizers)}')
        trainable = [p for p in self.policy.parameters() if p.requires_grad]  # with LoRA: the adapters
        self.optimizer = getattr(torch.optim, config.optimizer)(trainable, lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (config.warmup_steps + 1)))
        self.example_counter = self.batch_counter = 0
        self.last_eval = self.last_checkpoint = None
        self.nonfinite_updates = self.nonfinite_streak = 0  # skipped updates: total, and in a row
        self.pending_metrics = defaultdict(list)  # training metrics not yet logged
        self.stop_signal = None
        self.metrics_path = os.path.join(run_dir, 'metrics.jsonl')

    # ---- hooks ---------------------------------------------------------------------------------

    def wrap_models(self, policy, reference_model):
        """Place the models; a model already split over GPUs by device_map stays where it is."""
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
        for model in (policy, reference_model):
            if model is not None and not getattr(model, 'hf_device_map', None):
                model.to(device)
        return policy, reference_model

    @property
    def device(self):
        return self.policy.get_input_embeddings().weight.device

    def clip_gradient(self) -> float:
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm).item()

    def generate(self, model, batch: Dict, **generate_kwargs) -> torch.Tensor:
        """Sampled continuations (B, new tokens) of the left-padded prompts."""
        prompt = batch['prompt_input_ids']
        output = model.generate(input_ids=prompt, attention_mask=batch['prompt_attention_mask'], do_sample=True,
                                max_new_tokens=max(1, self.config.max_length - prompt.shape[1]),
                                pad_token_id=self.tokenizer.pad_token_id, **generate_kwargs)
        return output[:, prompt.shape[1]:]

    @contextlib.contextmanager
    def reference_forward(self):
        """Yields the model to run as the reference, in no-grad mode: the frozen reference model, or with
        LoRA the policy itself with its adapters disabled (the same weights, so no second copy)."""
        with torch.no_grad():
            if self.reference_model is not None:
                yield self.reference_model
            else:
                with lora.adapters_disabled(self.policy) as reference:
                    yield reference

    def policy_state_dict(self, trainable_only: bool = True) -> Dict[str, torch.Tensor]:
        """The policy's weights on CPU. trainable_only (what checkpoints hold): without the frozen ones, so
        with LoRA only the adapter; in full fine-tuning every weight."""
        state = {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}
        return lora.trainable_state(self.policy, state) if trainable_only else state

    def load_policy_state_dict(self, state: Dict[str, torch.Tensor]):
        """Load what `policy_state_dict()` returned (frozen weights stay as the model files gave them)."""
        result = self.policy.load_state_dict(state, strict=False)
        lora.check_loaded_keys(self.policy, result.missing_keys, result.unexpected_keys, 'the checkpoint\'s policy.pt')

    def save(self, output_dir: Optional[str] = None, metrics: Optional[Dict] = None):
        """Write a checkpoint directory (default `<run_dir>/LATEST`): policy.pt, optimizer.pt and
        scheduler.pt in the reference's format, and training_state.pt for resuming. The directory
        appears only once complete."""
        output_dir = output_dir or os.path.join(self.run_dir, 'LATEST')
        files = {'policy.pt': self.policy_state_dict(), 'optimizer.pt': self.optimizer.state_dict(),
                 'scheduler.pt': self.scheduler.state_dict()}
        if self.rank == 0:
            with utils.atomic_directory(output_dir) as tmp:
                self._write_checkpoint(tmp, files, metrics)
            utils.prune_checkpoints(self.run_dir, self.config.keep_checkpoints)

    def _write_checkpoint(self, directory: str, files: Dict[str, Dict], metrics: Optional[Dict]):
        for name, state in files.items():
            torch.save({'step_idx': self.example_counter, 'state': state, 'metrics': metrics or {}},
                       os.path.join(directory, name))
        torch.save(self.training_state(), os.path.join(directory, utils.CHECKPOINT_STATE))

    def load_model_state(self, checkpoint_dir: str):
        """Policy, optimizer and scheduler from a checkpoint directory written by `save`."""
        load = lambda name: torch.load(os.path.join(checkpoint_dir, name), map_location='cpu', weights_only=False)
        self.load_policy_state_dict(load('policy.pt')['state'])
        self.optimizer.load_state_dict(load('optimizer.pt')['state'])
        self.scheduler.load_state_dict(load('scheduler.pt')['state'])

    def load_training_state(self, checkpoint_dir: str):
        """Continue from a checkpoint written by `save`: weights, optimizer, scheduler, counters,
        data position and RNG; metrics.jsonl loses the lines logged after that checkpoint."""
        self.load_model_state(checkpoint_dir)
        state = torch.load(os.path.join(checkpoint_dir, utils.CHECKPOINT_STATE), weights_only=False)
        for key in ('example_counter', 'batch_counter', 'last_eval', 'nonfinite_updates', 'nonfinite_streak'):
            setattr(self, key, state[key])
        utils.set_rng_state(state['rng'])
        if self.rank == 0 and os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                kept = [line for line in f if json.loads(line)['step'] <= self.example_counter]
            with open(self.metrics_path + '.tmp', 'w') as f:
                f.writelines(kept)
            os.replace(self.metrics_path + '.tmp', self.metrics_path)
        utils.rank0_print(f'resumed from {checkpoint_dir} after {self.example_counter} examples')

    def training_state(self) -> Dict:
        import wandb
        return {'example_counter': self.example_counter, 'batch_counter': self.batch_counter,
                'last_eval': self.last_eval, 'nonfinite_updates': self.nonfinite_updates,
                'nonfinite_streak': self.nonfinite_streak, 'rng': utils.rng_state(),
                'wandb_id': wandb.run.id if wandb.run is not None else None}

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank, so that all ranks take the same branch."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def export_hf(self, output_dir: Optional[str] = None):
        """The policy in Hugging Face format (AutoModelForCausalLM.from_pretrained loads it) with its tokenizer;
        with LoRA the adapter merged into it, and the adapter alone in <run dir>/adapter."""
        state = self.policy_state_dict(trainable_only=False)  # every rank takes part in gathering a sharded policy
        if self.rank != 0:
            return
        output_dir = output_dir or os.path.join(self.run_dir, 'hf')
        if lora.is_lora(self.policy):
            adapter_dir, _ = lora.export(self.policy, state, self.run_dir, self.tokenizer, output_dir)
            utils.rank0_print(f'exported the LoRA adapter to {adapter_dir}')
        else:
            self.policy.save_pretrained(output_dir, state_dict=state)
            self.tokenizer.save_pretrained(output_dir)
        utils.rank0_print(f'exported the policy in Hugging Face format to {output_dir}')

    # ---- forward and metrics -------------------------------------------------------------------

    def concatenated_forward(self, batch: Dict) -> Tuple[SequenceStats, SequenceStats]:
        """Chosen and rejected through the policy in one pass and through the reference in one pass
        (no grad) -> per-sequence statistics for the chosen half and the rejected half, computed as
        `stats_impl` says: naive (the reference's full-vocabulary tensors), chunked (same logits,
        bounded memory) or fused (from hidden states; full logits never exist). All are exact."""
        inputs = concatenated_inputs(batch)
        ids, mask, labels = (inputs[f'concatenated_{k}'] for k in ('input_ids', 'attention_mask', 'labels'))
        if self.stats_impl == 'fused':
            hidden = token_stats.final_hidden_states(self.policy, ids, mask)
            with self.reference_forward() as reference:
                reference_hidden = token_stats.final_hidden_states(reference, ids, mask)
                reference_head = token_stats.output_head(reference)
            stats = token_stats.fused_sequence_stats(hidden, token_stats.output_head(self.policy), reference_hidden,
                                                     reference_head, labels)
        else:
            logits = self.policy(ids, attention_mask=mask).logits
            with self.reference_forward() as reference:
                reference_logits = reference(ids, attention_mask=mask).logits
            stats_fn = _tdpo_get_batch_logps if self.stats_impl == 'naive' else token_stats.chunked_sequence_stats
            stats = stats_fn(logits, reference_logits, labels)
        n = batch['chosen_input_ids'].shape[0]
        return SequenceStats(*(s[:n] for s in stats)), SequenceStats(*(s[n:] for s in stats))

    def get_batch_metrics(self, batch: Dict, train: bool = True) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """Mean loss of the batch and per-example metrics (gathered over ranks), with the reference's names."""
        split = 'train' if train else 'eval'
        values = {}
        if self.is_sft:
            logits = self.policy(batch['chosen_input_ids'], attention_mask=batch['chosen_attention_mask']).logits
            chosen_logps = _get_batch_logps(logits, batch['chosen_labels'])
            losses = -chosen_logps
        else:
            chosen, rejected = self.concatenated_forward(batch)
            losses, chosen_rewards, rejected_rewards = self.preference_loss(chosen, rejected)
            chosen_logps = chosen.logps
            values.update({
                f'rewards_{split}/chosen': chosen_rewards, f'rewards_{split}/rejected': rejected_rewards,
                f'rewards_{split}/accuracies': (chosen_rewards > rejected_rewards).float(),
                f'rewards_{split}/margins': chosen_rewards - rejected_rewards,
                f'kl_{split}/chosen': chosen.position_kl, f'kl_{split}/rejected': rejected.position_kl,
                f'kl_{split}/margin': chosen.position_kl - rejected.position_kl,
                f'logps_{split}/rejected': rejected.logps})
        values[f'logps_{split}/chosen'] = chosen_logps
        values[f'loss/{split}'] = losses
        metrics = {k: utils.all_gather_if_needed(v.detach().float(), self.data_world_size).cpu().tolist()
                   for k, v in values.items()}
        return losses.mean(), metrics

    def get_batch_samples(self, batch: Dict) -> Tuple[List[str], List[str]]:
        """Sampled completions from the policy and (for preference losses) the reference."""
        decode = lambda ids: self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        policy_samples = decode(self.generate(self.policy, batch))
        if self.is_sft:
            return policy_samples, []
        with self.reference_forward() as reference:
            return policy_samples, decode(self.generate(reference, batch))

    # ---- the run -------------------------------------------------------------------------------

    def log(self, metrics: Dict, split: str):
        """One JSON line in metrics.jsonl and one wandb step, keyed by examples seen (rank 0 only)."""
        if self.rank != 0:
            return
        import wandb
        if wandb.run is not None:
            wandb.log(metrics, step=self.example_counter)
        with open(self.metrics_path, 'a') as f:
            f.write(json.dumps({'split': split, 'step': self.example_counter, **metrics}) + '\n')

    def _log_train(self):
        """Log the means of the training metrics pending since the last log, with the counters."""
        if not self.pending_metrics:
            return
        mean_metrics = {k: sum(v) / len(v) for k, v in self.pending_metrics.items()}
        self.pending_metrics = defaultdict(list)
        mean_metrics['counters/examples'] = self.example_counter
        mean_metrics['counters/updates'] = self.batch_counter
        mean_metrics['counters/nonfinite_updates'] = self.nonfinite_updates
        self.log(mean_metrics, 'train')

    def evaluate(self) -> Dict[str, float]:
        utils.rank0_print(f'running evaluation after {self.example_counter} train examples')
        self.policy.eval()
        all_metrics = defaultdict(list)
        batches = preference_datasets.batch_iterator(self.eval_examples, self.config.eval_batch_size,
                                                     self.tokenizer.pad_token_id, shuffle=False, n_epochs=1,
                                                     drop_last=False)
        samples, n_sample_batches = [], math.ceil(self.config.n_eval_model_samples / self.config.eval_batch_size)
        for i, batch in enumerate(tqdm(batches, desc='Computing eval metrics', disable=self.rank != 0, leave=False)):
            local = utils.move_batch(utils.slice_batch(batch, self.data_rank, self.data_world_size), self.device)
            with torch.no_grad():
                _, metrics = self.get_batch_metrics(local, train=False)
            for k, v in metrics.items():
                all_metrics[k].extend(v)
            if self.config.sample_during_eval and i < n_sample_batches:
                policy_samples, reference_samples = self.get_batch_samples(local)
                for j, prompt in enumerate(local['prompt']):
                    samples.append({'step': self.example_counter, 'prompt': prompt, 'policy': policy_samples[j],
                                    'reference': reference_samples[j] if reference_samples else None})
        mean_metrics = {k: sum(v) / len(v) for k, v in all_metrics.items()}
        self.last_eval = self.example_counter
        utils.rank0_print(f'eval after {self.example_counter}: {utils.formatted_dict(mean_metrics)}')
        self.log(mean_metrics, 'eval')
        if samples and self.rank == 0:
            self._log_samples(samples[:self.config.n_eval_model_samples])
        return mean_metrics

    def _log_samples(self, samples: List[Dict]):
        import wandb
        with open(os.path.join(self.run_dir, 'samples.jsonl'), 'a') as f:
            f.writelines(json.dumps(s) + '\n' for s in samples)
        if wandb.run is not None:
            columns = ['step', 'prompt', 'sample']
            wandb.log({'policy_samples': wandb.Table(columns=columns, data=[[s['step'], s['prompt'], s['policy']] for s in samples])},
                      step=self.example_counter)
            if not self.is_sft:
                wandb.log({'reference_samples': wandb.Table(columns=columns, data=[[s['step'], s['prompt'], s['reference']] for s in samples])},
                          step=self.example_counter)

    def train_batches(self):
        """Training batches from the current position (`batch_counter` batches in, after a resume)."""
        c = self.config
        return preference_datasets.batch_iterator(self.train_examples, c.batch_size, self.tokenizer.pad_token_id,
                                                  shuffle=True, seed=self.seed, n_epochs=c.n_epochs,
                                                  n_examples=c.n_examples, skip_batches=self.batch_counter)

    def n_train_examples(self) -> int:
        """Examples the run will train on: whole batches only, as batch_iterator yields them."""
        c = self.config
        per_epoch = len(self.train_examples) // c.batch_size * c.batch_size
        limits = [n // c.batch_size * c.batch_size for n in (c.n_examples, c.n_epochs and c.n_epochs * per_epoch) if n]
        return min(limits)

    def checkpoint(self, metrics: Optional[Dict] = None):
        """A resumable step-N/ checkpoint; pending training metrics are logged first, so that a resumed
        run logs exactly what an uninterrupted one does."""
        self._log_train()
        output_dir = os.path.join(self.run_dir, f'step-{self.example_counter}')
        utils.rank0_print(f'creating checkpoint to write to {output_dir}...')
        self.save(output_dir, metrics)
        self.last_checkpoint = self.example_counter

    def _on_stop_signal(self, signum, frame):
        utils.rank0_print(f'received signal {signum}: will checkpoint after this update and stop')
        self.stop_signal = signum

    def update(self, batch: Dict):
        """One optimizer update from gradient_accumulation_steps microbatches of this rank's share. A
        non-finite loss or gradient norm skips the update; too many in a row stop the run."""
        c = self.config
        start_time, step_metrics, finite = time.time(), defaultdict(list), True
        for microbatch_idx in range(c.gradient_accumulation_steps):
            microbatch = utils.slice_batch(batch, microbatch_idx, c.gradient_accumulation_steps)
            local = utils.move_batch(utils.slice_batch(microbatch, self.data_rank, self.data_world_size), self.device)
            loss, metrics = self.get_batch_metrics(local, train=True)
            finite &= math.isfinite(loss.item())
            (loss / c.gradient_accumulation_steps).backward()
            for k, v in metrics.items():
                step_metrics[k].extend(v)
        grad_norm = self.clip_gradient()
        if self.any_rank(not (finite and math.isfinite(grad_norm))):
            self.nonfinite_updates += 1
            self.nonfinite_streak += 1
            utils.rank0_print(f'skipping update {self.batch_counter + 1}: non-finite loss or gradient norm '
                              f'({self.nonfinite_streak} in a row)')
        else:
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_streak = 0
        self.optimizer.zero_grad()
        self.batch_counter += 1
        self.example_counter += c.batch_size
        step_metrics['examples_per_second'].append(c.batch_size / (time.time() - start_time))
        step_metrics['grad_norm'].append(grad_norm)
        for k, v in step_metrics.items():
            self.pending_metrics[k].extend(v)

    def train(self):
        """The reference's loop: evaluate every eval_every examples (and checkpoint), then one update;
        log at most every minimum_log_interval_secs. SIGTERM/SIGUSR1 (preemption) checkpoint and raise
        `Preempted` after the current update."""
        c = self.config
        utils.rank0_print(f'using {c.optimizer} optimizer, {self.n_train_examples()} train examples')
        if self.example_counter == 0:
            utils.seed_everything(self.seed)
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._on_stop_signal)
        last_log = None
        progress = tqdm(total=self.n_train_examples(), initial=self.example_counter, unit='ex',
                        desc=f'{c.loss.name} training', disable=self.rank != 0, dynamic_ncols=True)
        for batch in self.train_batches():
            if (self.eval_examples and self.example_counter % c.eval_every == 0 and self.last_eval != self.example_counter
                    and (self.example_counter > 0 or c.do_first_eval)):
                eval_metrics = self.evaluate()
                if self.example_counter > 0 and not c.debug:
                    self.checkpoint(eval_metrics)
            if (c.checkpoint_every and self.example_counter % c.checkpoint_every == 0 and self.example_counter > 0
                    and self.last_checkpoint != self.example_counter and not c.debug):
                self.checkpoint()
            self.policy.train()
            self.update(batch)
            progress.update(c.batch_size)
            postfix = {'loss': np.mean(self.pending_metrics['loss/train'])}
            if not self.is_sft:
                postfix['acc'] = np.mean(self.pending_metrics['rewards_train/accuracies'])
            progress.set_postfix({k: f'{v:.4g}' for k, v in postfix.items()}, refresh=False)
            if last_log is None or time.time() - last_log > c.minimum_log_interval_secs:
                self._log_train()
                last_log = time.time()
            if self.nonfinite_streak >= c.max_nonfinite_updates:
                self.checkpoint()
                raise NonFiniteError(f'{self.nonfinite_streak} updates in a row had a non-finite loss or gradient '
                                     f'norm; the last good state is in {self.run_dir}/step-{self.example_counter}')
            if self.any_rank(self.stop_signal is not None):
                self.checkpoint()
                raise Preempted(f'stopped by signal {self.stop_signal} after {self.example_counter} examples; '
                                f'checkpoint in {self.run_dir}/step-{self.example_counter}')
        progress.close()
        self._log_train()  # updates since the last (rate-limited) log
        if self.eval_examples and self.last_eval != self.example_counter:
            self.evaluate()


# ----------------------------------------------------------------------------------------------
# Distributed trainers: one process per device, started by train.py or torchrun (see README)
# ----------------------------------------------------------------------------------------------

def _device_mesh(world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh('cuda' if torch.cuda.is_available() else 'cpu', (world_size,))


class ShardedTrainer(BasicTrainer):
    """What FSDP and tensor parallelism share: parameters are DTensors sliced over the ranks, so every
    rank takes part in each forward, gradient norm and state-dict gather, and checkpoints are written
    by all ranks (torch.distributed.checkpoint) besides the reference-format policy.pt from rank 0."""
    distributed = True

    def clip_gradient(self) -> float:
        """clip_grad_norm_ of BasicTrainer over parameters that are partly DTensors, partly plain tensors."""
        from torch.distributed.tensor import DTensor
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        norms = [torch.linalg.vector_norm(g.float()) for g in grads]
        norms = [n.full_tensor() if isinstance(n, DTensor) else n for n in norms]
        total_norm = torch.linalg.vector_norm(torch.stack(norms)).item()
        scale = min(1.0, self.config.max_grad_norm / (total_norm + 1e-6))
        for g in grads:
            g.mul_(scale)
        return total_norm

    def generate(self, model, batch: Dict, **generate_kwargs) -> torch.Tensor:
        # every forward is collective: a rank whose samples all ended keeps stepping until all have
        return super().generate(model, batch, synced_gpus=True, **generate_kwargs)

    def policy_state_dict(self, trainable_only: bool = True) -> Dict[str, torch.Tensor]:
        """The full policy (trainable_only: without frozen weights, so with LoRA the adapter) on CPU on rank 0,
        an empty dict on the others; every rank must call it."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        state = get_model_state_dict(self.policy, options=self._state_dict_options(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only))
        return lora.trainable_state(self.policy, state) if trainable_only else state

    @staticmethod
    def _state_dict_options(**options):
        """Checkpoints hold trainable weights only (with LoRA the adapter), so loads are not strict: the
        loaded keys are checked by lora.check_loaded_keys instead."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(**{'ignore_frozen_params': True, 'strict': False, **options})

    def _sharded_state_dicts(self, options):
        """(policy, optimizer) state dicts of this rank's shards; the policy's without frozen weights."""
        from torch.distributed.checkpoint.state_dict import get_state_dict
        policy_state, optimizer_state = get_state_dict(self.policy, self.optimizer, options=options)
        return lora.trainable_state(self.policy, policy_state), optimizer_state

    def save(self, output_dir: Optional[str] = None, metrics: Optional[Dict] = None):
        """policy.pt (the full policy's trainable weights), scheduler.pt and training_state.pt as BasicTrainer
        writes them, and the policy and optimizer in sharded/ (each rank writes its own shards; no rank ever
        holds the whole optimizer state). All ranks write into rank 0's temporary directory, which rank 0 renames once
        every rank is done."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        output_dir = output_dir or os.path.join(self.run_dir, 'LATEST')
        policy_state, optimizer_state = self._sharded_state_dicts(self._state_dict_options())
        full_policy = self.policy_state_dict()
        tmp = [f'{output_dir}.tmp-{os.getpid()}']
        dist.broadcast_object_list(tmp, src=0)
        dcp.save({'policy': policy_state, 'optimizer': optimizer_state}, checkpoint_id=os.path.join(tmp[0], 'sharded'))
        dist.barrier()
        if self.rank == 0:
            with utils.atomic_directory(output_dir, tmp=tmp[0]) as directory:
                self._write_checkpoint(directory, {'policy.pt': full_policy, 'scheduler.pt': self.scheduler.state_dict()},
                                       metrics)
            utils.prune_checkpoints(self.run_dir, self.config.keep_checkpoints)
        dist.barrier()  # no rank moves on before the checkpoint exists

    def load_model_state(self, checkpoint_dir: str):
        """Policy, optimizer and scheduler from a directory written by `save` (with the same number of
        ranks or another: torch.distributed.checkpoint reshards)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        options = self._state_dict_options()
        policy_state, optimizer_state = self._sharded_state_dicts(options)
        state = {'policy': policy_state, 'optimizer': optimizer_state}
        dcp.load(state, checkpoint_id=os.path.join(checkpoint_dir, 'sharded'))
        result = set_state_dict(self.policy, self.optimizer, model_state_dict=state['policy'],
                                optim_state_dict=state['optimizer'], options=options)
        lora.check_loaded_keys(self.policy, result.missing_keys, result.unexpected_keys, f'{checkpoint_dir}/sharded')
        scheduler = torch.load(os.path.join(checkpoint_dir, 'scheduler.pt'), map_location='cpu', weights_only=False)
        self.scheduler.load_state_dict(scheduler['state'])


def transformer_blocks(model, block_name: Optional[str]) -> List[torch.nn.Module]:
    """The modules of class `block_name`, or else of the classes transformers never splits
    (`_no_split_modules`: the decoder layers)."""
    names = [block_name] if block_name else list(getattr(model, '_no_split_modules', None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f'{type(model).__name__} has no module of class {names or "?"}: set model.block_name '
                         f'to the class name of its transformer block (e.g. LlamaDecoderLayer)')
    return blocks


class FSDPTrainer(ShardedTrainer):
    """Fully sharded data parallel (FSDP2, `fully_shard`): each rank holds 1/world_size of every
    parameter, gradient and optimizer state, gathers one transformer block at a time for its forward
    and backward, and trains on its slice of each batch."""
    can_fuse_stats = False  # the root module's forward unshards embeddings and head; the fused path skips it

    def wrap_models(self, policy, reference_model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = _device_mesh(self.world_size)
        if self.config.activation_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})
        mp_dtype = self.config.model.fsdp_policy_mp
        # compute in mp_dtype, but keep the sharded weights and reduce gradients in full precision
        policy_mp = MixedPrecisionPolicy(param_dtype=getattr(torch, mp_dtype), reduce_dtype=torch.float32) \
            if mp_dtype else MixedPrecisionPolicy()
        for model, mp_policy in ((policy, policy_mp), (reference_model, MixedPrecisionPolicy())):
            if model is not None:
                for block in transformer_blocks(model, self.config.model.block_name):
                    fully_shard(block, mesh=mesh, mp_policy=mp_policy)
                # the rest: embeddings, final norm, head; of a LoRA policy's transformers model, whose forward
                # generate() calls directly
                fully_shard(lora.base_model(model), mesh=mesh, mp_policy=mp_policy)
        return policy, reference_model


class TensorParallelTrainer(ShardedTrainer):
    """Tensor parallelism (PyTorch-native, DTensor): each rank holds a slice of every attention and MLP
    weight (transformers' `base_model_tp_plan`: column-wise, then row-wise with one all-reduce), and all
    ranks compute on the whole batch together. Launch with torchrun, one process per GPU of a node."""
    splits_batches = False
    supports_lora = False  # the plan's column- and row-wise styles apply to nn.Linear, not to peft's LoRA layers

    def wrap_models(self, policy, reference_model):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = _device_mesh(self.world_size)
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
        styles = {'colwise': ColwiseParallel, 'rowwise': RowwiseParallel}
        for model in (policy, reference_model):
            if model is None:
                continue
            config, plan = model.config, getattr(model.config, 'base_model_tp_plan', None) or {}
            heads = (config.num_attention_heads, getattr(config, 'num_key_value_heads', config.num_attention_heads))
            if not plan or any(h % self.world_size for h in heads):
                raise ValueError(f'cannot split {type(model).__name__} over {self.world_size} ranks: needs a '
                                 f'transformers tensor-parallel plan (has {bool(plan)}) and attention and key/value '
                                 f'heads {heads} divisible by the number of ranks')
            # an embedding_rowwise entry only saves memory: that embedding stays whole on every rank
            unknown = {s for s in plan.values() if s not in styles and s != 'embedding_rowwise'}
            if unknown:
                raise ValueError(f'tensor-parallel styles {sorted(unknown)} of {type(model).__name__} are not supported')
            model.to(device)
            parallelize_module(model.base_model, mesh, {k: styles[s]() for k, s in plan.items() if s in styles})
        return policy, reference_model

    def generate(self, model, batch: Dict, **generate_kwargs) -> torch.Tensor:
        # the ranks hold slices of one model, so they must sample the same tokens: same seed on each
        with torch.random.fork_rng(devices=[self.device] if self.device.type == 'cuda' else []):
            torch.manual_seed(self.seed + self.example_counter)
            return super().generate(model, batch, **generate_kwargs)
