"""Loss math and trainers for SFT, TDPO (Zeng et al., ICML 2024, arXiv 2404.11999), DPO and IPO.

Read top to bottom: first the pure functions of tensors (each tested against a naive
implementation of its equation in tests/test_losses.py), then `BasicTrainer`, the whole
single-process run, with `concatenated_forward`, the one forward pass every loss and trainer uses.
The distributed trainers (sharded_trainers.py) subclass BasicTrainer and override only its named hooks.
"""
import contextlib
import json
import math
import os
import random
import time
from collections import defaultdict
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

import checkpoints
import lora
import pair_layout
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


def _row_logps(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, seq: torch.Tensor,
               n_sequences: int) -> torch.Tensor:
    """`_get_batch_logps` on flattened positions: logits (M, V); rows (N,) the positions that predict
    response tokens `targets` (N,) of sequences `seq` (N,) (pair_layout.response_rows) -> (n_sequences,)."""
    token_logps = logits[rows].float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(n_sequences, device=logits.device).index_add_(0, seq, token_logps)


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


# ----------------------------------------------------------------------------------------------
# Trainers
# ----------------------------------------------------------------------------------------------

class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint (none before the first update); rerun with
    resume=true."""


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates; the last good state was checkpointed."""


class BasicTrainer:
    """Single process: one device, or one model split over all local GPUs (device_map='balanced').

    Subclasses change behaviour only through the hooks: `policy_compute_dtype`, `wrap_models`,
    `clip_gradient`, `final_hidden_states`, `policy_state_dict`, `generate`, `checkpoint_files`,
    `load_model_state`, and the class attributes below. `reference_forward` is where the reference runs:
    a frozen copy, or with LoRA the policy with its adapters disabled.
    """
    # train.py starts one process per GPU (or torchrun does) for a distributed trainer, else one process
    distributed = False
    # the ranks split each batch between them (data parallel); tensor-parallel ranks all see the whole batch
    splits_batches = True
    # counters that training_state.pt holds and a resumed run continues from
    RESUMED = ('example_counter', 'batch_counter', 'last_eval', 'nonfinite_updates', 'nonfinite_streak')
    # trains a LoRA policy (lora.r set; see lora.py)
    supports_lora = True

    def __init__(self, policy, config: DictConfig, seed: int, run_dir: str, reference_model=None,
                 rank: int = 0, world_size: int = 1, data: Optional[preference_datasets.RunData] = None):
        self.config, self.seed, self.run_dir = config, seed, run_dir
        self.rank, self.world_size = rank, world_size
        self.data_rank, self.data_world_size = (rank, world_size) if self.splits_batches else (0, 1)
        self.is_sft = config.loss.name == 'sft'
        self.preference_loss = None if self.is_sft else build_preference_loss(config.loss)
        if data is None:  # train.py loads it before the models; tests and benchmarks leave it to the trainer
            data = preference_datasets.load_run_data(config, utils.get_local_dir(config.local_dirs), rank != 0)
        self.tokenizer, self.train_examples = data.tokenizer, data.train
        eval_examples = list(data.eval)
        random.Random(seed).shuffle(eval_examples)
        n_eval = min(config.n_eval_examples or 0, len(eval_examples))
        self.eval_examples = eval_examples[:n_eval - n_eval % self.data_world_size]  # equal slices per rank
        utils.rank0_print(f'{len(self.train_examples)} train and {len(self.eval_examples)} eval examples')

        self.policy, self.reference_model = self.wrap_models(policy, reference_model)
        self.stats_impl = self.choose_stats_impl()
        self.fused_stats_checked = False  # check_fused_stats runs once, on the first preference batch
        trainable = [p for p in self.policy.parameters() if p.requires_grad]  # with LoRA: the adapters
        self.optimizer = getattr(torch.optim, config.optimizer)(trainable, lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (config.warmup_steps + 1)))
        self.example_counter = self.batch_counter = 0
        self.last_eval = self.last_checkpoint = None
        self.loaded_checkpoint = None  # (directory, examples seen) after a resume
        self.nonfinite_updates = self.nonfinite_streak = 0  # skipped updates: total, and in a row
        self.pending_metrics = defaultdict(list)  # training metrics not yet logged
        self.metrics_path = os.path.join(run_dir, 'metrics.jsonl')
        self.pair_layout = self.choose_pair_layout(config.pair_layout)

    # ---- hooks ---------------------------------------------------------------------------------

    @classmethod
    def policy_compute_dtype(cls, model_config: DictConfig) -> str:
        """The dtype the policy's forward computes in: its weights' (FSDPTrainer: its mixed precision)."""
        return model_config.policy_dtype

    @classmethod
    def reference_dtype(cls, model_config: DictConfig) -> str:
        """model.reference_dtype, or where it is null the policy's compute dtype: a reference equal to the
        policy then computes exactly what the policy does (SeqKL 0 and loss log 2 at the start)."""
        return model_config.reference_dtype or cls.policy_compute_dtype(model_config)

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

    def final_hidden_states(self, model, inputs: Dict) -> torch.Tensor:
        """(R, L, H) hidden states that `model` feeds into its output layer, for model_inputs `inputs`."""
        return token_stats.final_hidden_states(model, **inputs)

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
        lora.load_trainable_state(self.policy, state, 'the checkpoint\'s policy.pt')

    def checkpoint_files(self) -> Tuple[Dict[str, Dict], Optional[Dict]]:
        """What a checkpoint holds: (file name -> state dict, written by rank 0 in the reference's format;
        a state dict every rank writes its shards of, or None). Every rank calls it."""
        return {'policy.pt': self.policy_state_dict(), 'optimizer.pt': self.optimizer.state_dict(),
                'scheduler.pt': self.scheduler.state_dict()}, None

    def save(self, output_dir: Optional[str] = None, metrics: Optional[Dict] = None):
        """Write a checkpoint directory (default `<run_dir>/LATEST`) with checkpoints.save: the files of
        `checkpoint_files` and training_state.pt, appearing only complete; then prune old ones."""
        output_dir = output_dir or os.path.join(self.run_dir, 'LATEST')
        if (os.path.realpath(output_dir), self.example_counter) == self.loaded_checkpoint:
            return  # this state is the checkpoint just loaded: never rewrite it
        files, sharded = self.checkpoint_files()
        checkpoints.save(output_dir, self.example_counter, files, self.training_state(), metrics, sharded,
                         self.rank, self.world_size)
        if self.rank == 0:
            checkpoints.prune(self.run_dir, self.config.keep_checkpoints)

    def load_model_state(self, checkpoint_dir: str):
        """Policy, optimizer and scheduler from a checkpoint directory written by `save`."""
        load = lambda name: checkpoints.load_state(os.path.join(checkpoint_dir, name), self.config.trust_checkpoint_code)
        self.load_policy_state_dict(load('policy.pt'))
        self.optimizer.load_state_dict(load('optimizer.pt'))
        self.scheduler.load_state_dict(load('scheduler.pt'))

    def load_training_state(self, checkpoint_dir: str):
        """Continue from a checkpoint written by `save`: weights, optimizer, scheduler, counters,
        data position and RNG; metrics.jsonl loses the lines logged after that checkpoint."""
        self.load_model_state(checkpoint_dir)
        state = checkpoints.load_training_state(checkpoint_dir, self.config.trust_checkpoint_code)
        for key in self.RESUMED:
            setattr(self, key, state[key])
        checkpoints.set_rng_state(state['rng'])
        self.last_checkpoint = self.example_counter
        self.loaded_checkpoint = (os.path.realpath(checkpoint_dir), self.example_counter)
        if self.rank == 0:
            checkpoints.truncate_metrics(self.metrics_path, self.example_counter)
        utils.rank0_print(f'resumed from {checkpoint_dir} after {self.example_counter} examples')

    def training_state(self) -> Dict:
        import wandb
        return {**{key: getattr(self, key) for key in self.RESUMED}, 'rng': checkpoints.rng_state(),
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
        checkpoints.write_manifest(os.path.join(output_dir, checkpoints.MANIFEST), [output_dir])  # last: complete
        utils.rank0_print(f'exported the policy in Hugging Face format to {output_dir}')

    # ---- forward and metrics -------------------------------------------------------------------

    def choose_stats_impl(self) -> str:
        """config.stats_impl, or 'chunked' (saying why, once) where 'fused' cannot work: an output layer
        that is not a plain linear map on a device."""
        if self.config.stats_impl != 'fused' or self.is_sft:
            return self.config.stats_impl
        if token_stats.output_head(self.policy) is None:
            utils.rank0_print("stats_impl=fused: not with this model's output layer; using 'chunked'")
            return 'chunked'
        return 'fused'

    def check_fused_stats(self, batch: Dict):
        """Once per run, on the first preference batch: the logits the fused statistics stand for (final
        hidden states @ output weight) must equal each model's own; if not, use 'chunked' (saying why)."""
        if self.stats_impl != 'fused' or self.fused_stats_checked:
            return
        self.fused_stats_checked = True
        ids, mask = batch['chosen_input_ids'], batch['chosen_attention_mask']
        problem = token_stats.fused_head_mismatch(self.policy, ids, mask, self.final_hidden_states)
        if problem is None:
            with self.reference_forward() as reference:
                problem = token_stats.fused_head_mismatch(reference, ids, mask, self.final_hidden_states)
        if self.any_rank(problem is not None):
            utils.rank0_print(f"stats_impl=fused: {problem or 'the check failed on another rank'}; using 'chunked'")
            self.stats_impl = 'chunked'

    def choose_pair_layout(self, layout: str) -> str:
        """`layout`, or 'padded' (with one message naming why) if a model cannot take its masks."""
        if layout == 'padded':
            return layout
        for model in (self.policy, self.reference_model):
            reason = model is not None and (pair_layout.prepare_model(model)
                                            or pair_layout.check_model(model, len(self.tokenizer)))
            if reason:
                utils.rank0_print(f"pair_layout={layout}: {reason}; using 'padded'")
                return 'padded'
        return layout

    def concatenated_forward(self, batch: Dict) -> Tuple[SequenceStats, SequenceStats]:
        """Chosen and rejected through the policy in one pass and through the reference in one pass
        (no grad), laid out as `pair_layout` says (padded, shared or packed: pair_layout.py) ->
        per-sequence statistics for the chosen half and the rejected half, computed as `stats_impl`
        says: naive (the reference's full-vocabulary tensors), chunked (same logits, bounded memory,
        response rows only) or fused (from hidden states; full logits never exist). All are exact."""
        layout = pair_layout.arrange(batch, self.pair_layout, self.config.max_length)
        n = layout.n_sequences
        if self.stats_impl == 'fused':
            hidden = self.final_hidden_states(self.policy, pair_layout.model_inputs(layout, self.policy))
            with self.reference_forward() as reference:
                reference_hidden = self.final_hidden_states(reference, pair_layout.model_inputs(layout, reference))
                reference_head = token_stats.output_head(reference)
            stats = token_stats.fused_row_stats(hidden.flatten(0, 1), token_stats.output_head(self.policy),
                                                reference_hidden.flatten(0, 1), reference_head,
                                                *pair_layout.response_rows(layout), n)
        else:
            logits = self.policy(**pair_layout.model_inputs(layout, self.policy)).logits
            with self.reference_forward() as reference:
                reference_logits = reference(**pair_layout.model_inputs(layout, reference)).logits
            if self.stats_impl == 'naive':
                stats = _tdpo_get_batch_logps(pair_layout.unpack(layout, logits), pair_layout.unpack(layout, reference_logits),
                                              layout.labels)
            else:
                stats = token_stats.chunked_row_stats(logits.flatten(0, 1), reference_logits.flatten(0, 1),
                                                      *pair_layout.response_rows(layout), n)
        return SequenceStats(*(s[:n // 2] for s in stats)), SequenceStats(*(s[n // 2:] for s in stats))

    def sft_logps(self, batch: Dict) -> torch.Tensor:
        """log πθ(y|x) of each chosen response (B,), padded (the reference's computation) or packed."""
        layout = pair_layout.arrange(batch, self.pair_layout, self.config.max_length, sft=True)
        logits = self.policy(**pair_layout.model_inputs(layout, self.policy)).logits
        if layout.document is None:
            return _get_batch_logps(logits, layout.labels)
        return _row_logps(logits.flatten(0, 1), *pair_layout.response_rows(layout), layout.n_sequences)

    def get_batch_metrics(self, batch: Dict, train: bool = True) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """Mean loss of the batch and per-example metrics (gathered over ranks), with the reference's names."""
        split = 'train' if train else 'eval'
        values = {}
        if self.is_sft:
            chosen_logps = self.sft_logps(batch)
            losses = -chosen_logps
        else:
            self.check_fused_stats(batch)
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
                local_samples = [{'step': self.example_counter, 'prompt': prompt, 'policy': policy_samples[j],
                                  'reference': reference_samples[j] if reference_samples else None}
                                 for j, prompt in enumerate(local['prompt'])]
                samples += utils.all_gather_objects(local_samples, self.data_world_size)  # the whole batch, in order
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
        return min(limits, default=0)  # 0: fewer examples than one batch; train_batches says so

    def checkpoint(self, metrics: Optional[Dict] = None):
        """A resumable step-N/ checkpoint; pending training metrics are logged first, so that a resumed
        run logs exactly what an uninterrupted one does."""
        self._log_train()
        output_dir = os.path.join(self.run_dir, f'step-{self.example_counter}')
        utils.rank0_print(f'creating checkpoint to write to {output_dir}...')
        self.save(output_dir, metrics)
        self.last_checkpoint = self.example_counter

    @property
    def stop_signal(self) -> Optional[int]:
        """SIGTERM or SIGUSR1 once this process received one (see `utils.catch_stop_signals`), else None."""
        return utils.received_stop_signal()

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
        `Preempted` after the current update (before the first: raise it without a checkpoint)."""
        c = self.config
        utils.rank0_print(f'using {c.optimizer} optimizer, {self.n_train_examples()} train examples')
        if self.example_counter == 0:
            utils.seed_everything(self.seed)
        utils.catch_stop_signals()
        if self.any_rank(self.stop_signal is not None):  # it came while the run started: nothing new to save
            raise Preempted(f'stopped by signal {self.stop_signal} before the first update (after '
                            f'{self.example_counter} examples): no new checkpoint')
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
