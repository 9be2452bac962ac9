"""Trainers for SFT, TDPO (Zeng et al., ICML 2024, arXiv 2404.11999), DPO and IPO.

Read top to bottom: `BasicTrainer`, the whole single-process run: its named hooks, the batch's metrics, then
the loops (`update`, `train`). It calls modules with one job each: pair_forward.py (the one forward pass every
loss and trainer uses, and the choice of its layout and statistics), training_eval.py (the evaluation pass and
its samples), run_logging.py (metrics.jsonl, samples.jsonl, wandb), checkpoints.py (how checkpoints and the
export are written, read and resumed from), losses.py (the loss math; its names stay importable from here:
`trainers.tdpo_loss`, `trainers._tdpo_get_batch_logps`, ...).
The distributed trainers (sharded_trainers.py) subclass BasicTrainer and override only its named hooks.
"""
import contextlib
import math
import os
import time
from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig
from tqdm import tqdm

import batches
import checkpoints
import distributed
import lora
import memory
import pair_forward
import preference_datasets
import run_logging
import stop_signals
import token_stats
import training_eval
import utils
from losses import (PreferenceLoss, SequenceStats, build_preference_loss, get_batch_logps,  # noqa: F401
                    preference_loss, tdpo_get_batch_logps, tdpo_loss)

_get_batch_logps = get_batch_logps  # the reference implementation's names, for its scripts and ours
_tdpo_get_batch_logps = tdpo_get_batch_logps


class Preempted(RuntimeError):
    """Training stopped on SIGTERM/SIGUSR1 after writing a checkpoint (none before the first update); rerun with
    resume=true."""


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite updates; the last good state was checkpointed."""


class BasicTrainer:
    """Single process: one device, or one model split over all local GPUs (device_map='balanced').

    Subclasses change behaviour only through the hooks: `policy_compute_dtype`, `wrap_models`,
    `enable_activation_checkpointing`, `clip_gradient`, `final_hidden_states`, `policy_state_dict`,
    `generate`, `checkpoint_files`, `load_model_state`, and the class attributes below. `reference_forward` is where the reference runs:
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
        self.eval_examples = batches.eval_examples(data.eval, seed, config.n_eval_examples,
                                                               self.data_world_size)
        utils.rank0_print(f'{len(self.train_examples)} train and {len(self.eval_examples)} eval examples')

        self.policy, self.reference_model = self.wrap_models(policy, reference_model)
        self.enable_activation_checkpointing()
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
        for model in (policy, reference_model):
            if model is not None and not getattr(model, 'hf_device_map', None):
                model.to(distributed.default_device())
        return policy, reference_model

    def enable_activation_checkpointing(self):
        """activation_checkpointing=true: the policy's blocks recompute their activations in backward
        (memory.py); run after wrap_models, on the placed, sharded or parallelized policy."""
        if self.config.activation_checkpointing:
            memory.enable_activation_checkpointing(self.policy)

    @property
    def device(self):
        return self.policy.get_input_embeddings().weight.device

    def clip_gradient(self) -> float:
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.max_grad_norm).item()

    def final_hidden_states(self, model, inputs: Dict) -> torch.Tensor:
        """(R, L, H) hidden states that `model` feeds into its output layer, for model_inputs `inputs`."""
        return token_stats.final_hidden_states(model, **inputs)

    def generate(self, model, batch: Dict, **generate_kwargs) -> torch.Tensor:
        """Sampled continuations (B, new tokens) of the left-padded prompts (training_eval.generate)."""
        return training_eval.generate(model, batch, self.config.max_length, self.tokenizer.pad_token_id,
                                      **generate_kwargs)

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

    def checkpoint_files(self) -> Tuple[Dict[str, Dict], Optional[Dict]]:
        """What a checkpoint holds: (file name -> state dict, written by rank 0 in the reference's format;
        a state dict every rank writes its shards of, or None). Every rank calls it."""
        return {'policy.pt': self.policy_state_dict(), 'optimizer.pt': self.optimizer.state_dict(),
                'scheduler.pt': self.scheduler.state_dict()}, None

    def save(self, output_dir: Optional[str] = None, metrics: Optional[Dict] = None):
        """Write a checkpoint directory (default `<run_dir>/LATEST`): the files of `checkpoint_files` and
        training_state.pt, appearing only complete; then prune old ones (checkpoints.save_trainer)."""
        checkpoints.save_trainer(self, output_dir, metrics, run_logging.wandb_run_id())

    def load_model_state(self, checkpoint_dir: str):
        """Policy, optimizer and scheduler from a checkpoint directory written by `save` (checkpoints)."""
        checkpoints.load_trainer_model_state(self, checkpoint_dir)

    def load_training_state(self, checkpoint_dir: str):
        """Continue from a checkpoint written by `save`: weights, optimizer, scheduler, counters, data position and
        RNG; metrics.jsonl loses the lines logged after that checkpoint (checkpoints.resume_trainer)."""
        checkpoints.resume_trainer(self, checkpoint_dir)

    def any_rank(self, flag: bool) -> bool:
        """Whether `flag` is true on any rank, so that all ranks take the same branch."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return bool(value.item())

    def export_hf(self, output_dir: Optional[str] = None):
        """The policy in Hugging Face format with its tokenizer (default <run dir>/hf; checkpoints)."""
        checkpoints.export_trainer_hf(self, output_dir)

    # ---- forward and metrics -------------------------------------------------------------------

    def choose_stats_impl(self) -> str:
        """config.stats_impl, or 'chunked' where 'fused' cannot work (pair_forward.choose_stats_impl)."""
        return pair_forward.choose_stats_impl(self.config.stats_impl, self.is_sft, self.policy)

    def check_fused_stats(self, batch: Dict):
        """Once per run, on the first preference batch: keep 'fused' only if its logits equal each model's own."""
        if self.stats_impl == 'fused' and not self.fused_stats_checked:
            self.fused_stats_checked = True
            self.stats_impl = pair_forward.check_fused_stats(batch, self.policy, self.reference_forward,
                                                             self.final_hidden_states, self.any_rank)

    def choose_pair_layout(self, layout: str) -> str:
        """`layout`, or 'padded' if a model cannot take its masks (pair_forward.choose_pair_layout)."""
        return pair_forward.choose_pair_layout(layout, (self.policy, self.reference_model), len(self.tokenizer))

    def concatenated_forward(self, batch: Dict) -> Tuple[SequenceStats, SequenceStats]:
        """Statistics of the chosen and the rejected half, as `pair_layout` and `stats_impl` say (pair_forward)."""
        return pair_forward.concatenated_forward(batch, self.policy, self.reference_forward, self.final_hidden_states,
                                                 self.pair_layout, self.stats_impl, self.config.max_length)

    def get_batch_metrics(self, batch: Dict, train: bool = True) -> Tuple[torch.Tensor, Dict[str, List[float]]]:
        """Mean loss of the batch and per-example metrics (gathered over ranks), with the reference's names."""
        split = 'train' if train else 'eval'
        if self.is_sft:  # log πθ(y|x) of each chosen response
            chosen_logps = pair_forward.sft_logps(batch, self.policy, self.pair_layout, self.config.max_length)
            losses, values = -chosen_logps, {f'logps_{split}/chosen': chosen_logps}
        else:
            self.check_fused_stats(batch)
            chosen, rejected = self.concatenated_forward(batch)
            losses, chosen_rewards, rejected_rewards = self.preference_loss(chosen, rejected)
            values = pair_forward.preference_metrics(split, chosen, rejected, chosen_rewards, rejected_rewards)
        values[f'loss/{split}'] = losses
        metrics = {k: distributed.all_gather_if_needed(v.detach().float(), self.data_world_size).cpu().tolist()
                   for k, v in values.items()}
        return losses.mean(), metrics

    def get_batch_samples(self, batch: Dict) -> Tuple[List[str], List[str]]:
        """Sampled completions from the policy and (for preference losses) the reference (training_eval)."""
        return training_eval.batch_samples(self, batch)

    # ---- the run -------------------------------------------------------------------------------

    def log(self, metrics: Dict, split: str):
        """One JSON line in metrics.jsonl and one wandb step, keyed by examples seen (rank 0 only; run_logging)."""
        if self.rank == 0:
            run_logging.log(metrics, split, self.example_counter, self.metrics_path)

    def _log_train(self):
        """Log the means of the training metrics pending since the last log, with the counters."""
        if self.pending_metrics:
            mean_metrics = run_logging.train_metrics(self.pending_metrics, self.example_counter, self.batch_counter,
                                                     self.nonfinite_updates)
            self.pending_metrics = defaultdict(list)
            self.log(mean_metrics, 'train')

    def evaluate(self) -> Dict[str, float]:
        """The eval metrics' means over the eval examples, logged; samples if sample_during_eval (training_eval)."""
        return training_eval.evaluate(self)

    def train_batches(self):
        """Training batches from the current position (`batch_counter` batches in, after a resume)."""
        c = self.config
        return batches.batch_iterator(self.train_examples, c.batch_size, self.tokenizer.pad_token_id,
                                                  shuffle=True, seed=self.seed, n_epochs=c.n_epochs,
                                                  n_examples=c.n_examples, skip_batches=self.batch_counter)

    def n_train_examples(self) -> int:
        """Examples the run will train on: whole batches only, as batch_iterator yields them."""
        return batches.n_train_examples(len(self.train_examples), self.config)

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
        """SIGTERM or SIGUSR1 once this process received one (see `stop_signals.catch_stop_signals`), else None."""
        return stop_signals.received_stop_signal()

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
        stop_signals.catch_stop_signals()
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
            progress.set_postfix(run_logging.progress_postfix(self.pending_metrics, self.is_sft), refresh=False)
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
