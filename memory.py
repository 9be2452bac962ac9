"""Memory at long context: activation checkpointing for every trainer, and what a run that runs out of
memory tells its user.

Activation checkpointing (`activation_checkpointing=true`): each transformer block of the policy keeps only
its input during the forward pass and recomputes the rest in the backward pass, so a step's activations
shrink from every block's to one block's at a time, for about one more forward pass of compute. It is
transformers' own mechanism (non-reentrant `torch.utils.checkpoint` around each decoder layer's `forward`,
outside the layer's module hooks, so FSDP2's and tensor parallelism's hooks are not replayed). The layer
checkpoints only when it is in training mode and gradients are enabled, so
  - the reference forward (no-grad, also LoRA's policy with its adapters off) keeps no activations and
    recomputes nothing;
  - evaluation and its sampling (the policy in eval mode, no-grad) run as without it, KV cache included.
The recomputation replays the same inputs, so packed rows' position ids and 4D attention masks survive it,
and losses and gradients equal those without checkpointing to float32 rounding (tests/test_memory.py,
tests/dist_memory_worker.py).

Out of memory: `torch.OutOfMemoryError` (CUDA), Python's `MemoryError` and the CPU allocator's failure
become one line naming the keys to change (`out_of_memory_advice`). The kernel's OOM killer sends SIGKILL,
which no process can answer: then the run dies without a line, and its checkpoints are those written before
(each complete or absent: checkpoints.py writes them atomically); resume=true continues from the newest.
"""
import traceback
import warnings
from typing import Optional

import torch

import lora


class CheckpointingUnsupported(ValueError):
    """activation_checkpointing=true on a model whose transformers class cannot checkpoint its blocks."""


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Turn on non-reentrant activation checkpointing in every transformer block of `model` (a transformers
    causal LM, or a LoRA PeftModel around one); returns the number of blocks that checkpoint. Non-reentrant
    checkpointing needs no inputs that require grad, so a LoRA policy's frozen embeddings need no hook."""
    base = lora.base_model(model)
    if not getattr(base, 'supports_gradient_checkpointing', False):
        raise CheckpointingUnsupported(f'activation_checkpointing=true: {type(base).__name__} does not support '
                                       f'activation checkpointing in transformers; set activation_checkpointing=false')
    kwargs = {'use_reentrant': False}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)  # gradient_checkpointing_enable: renamed in transformers 5
        if hasattr(base, 'activation_checkpointing_enable'):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    blocks = checkpointed_blocks(model)
    if not blocks:
        raise CheckpointingUnsupported(f'activation_checkpointing=true: no block of {type(base).__name__} took it; '
                                       f'set activation_checkpointing=false')
    return blocks


def checkpointed_blocks(model: torch.nn.Module) -> int:
    """How many transformer blocks of `model` recompute their activations in backward."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    return sum(isinstance(m, GradientCheckpointingLayer) and bool(m.gradient_checkpointing) for m in model.modules())


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's out-of-memory error, Python's MemoryError, or torch's CPU allocator failing (a RuntimeError)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)


def out_of_memory_advice(config, error: BaseException, rank: int, world_size: int, data_parallel: int,
                         newest_checkpoint: Optional[str]) -> str:
    """The one line a run that ran out of memory stops with: what ran out, what to change, what is kept.
    data_parallel: the ranks that split each batch (world_size, or 1 for tensor parallelism)."""
    what = 'CUDA out of memory' if isinstance(error, torch.OutOfMemoryError) else 'out of memory'
    where = f' on rank {rank} of {world_size}' if world_size > 1 else ''
    in_evaluation = any(frame.name == 'evaluate' for frame in traceback.extract_tb(error.__traceback__))
    if in_evaluation:  # no-grad: checkpointing and accumulation do not apply there
        changes = [f'a smaller eval_batch_size (now {config.eval_batch_size})']
        if config.sample_during_eval:
            changes.append('sample_during_eval=false')
        where += ' during evaluation'
    else:
        changes = [] if config.activation_checkpointing else ['activation_checkpointing=true']
        if not lora.enabled(config.get('lora')):
            changes.append('lora.r=16')
        changes.append(more_accumulation(config, data_parallel))
    kept = f'the checkpoints written so far are kept (newest: {newest_checkpoint})' if newest_checkpoint \
        else 'no checkpoint had been written yet'
    return f'{what}{where}: set {" or ".join(changes)}; {kept}'


def more_accumulation(config, data_parallel: int) -> str:
    """The next gradient_accumulation_steps that divides batch_size over the data-parallel ranks (smaller
    microbatches, the same updates), or, where each microbatch holds one example already, a shorter max_length."""
    steps, batch = config.gradient_accumulation_steps, config.batch_size
    more = next((s for s in range(steps + 1, batch // data_parallel + 1) if batch % (s * data_parallel) == 0), None)
    if more:
        return f'gradient_accumulation_steps={more} (now {steps}) at the same batch_size={batch}'
    return f'a smaller max_length (now {config.max_length}): each microbatch already holds one example'
