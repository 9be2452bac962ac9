"""The distributed trainers: one process per device, started by train.py or torchrun (see README).

They are BasicTrainer (trainers.py) with its named hooks overridden, nothing else: ShardedTrainer holds
what FSDP2 and DTensor tensor parallelism share (sharded gradient norms, collective sampling, sharded
checkpoints), FSDPTrainer and TensorParallelTrainer how each shards the models. TRAINERS names every
trainer for `trainer=...`.
"""
import inspect
import os
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

import checkpoints
import distributed
import lora
from trainers import BasicTrainer

def _device_mesh(world_size: int):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(distributed.default_device(), (world_size,))


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

    def checkpoint_files(self) -> Tuple[Dict[str, Dict], Optional[Dict]]:
        """The full policy.pt (gathered to rank 0) and scheduler.pt as BasicTrainer writes them, and the
        policy and optimizer as shards that each rank writes (no rank ever holds the whole optimizer state)."""
        policy_state, optimizer_state = self._sharded_state_dicts(self._state_dict_options())
        return ({'policy.pt': self.policy_state_dict(), 'scheduler.pt': self.scheduler.state_dict()},
                {'policy': policy_state, 'optimizer': optimizer_state})

    def load_model_state(self, checkpoint_dir: str):
        """Policy, optimizer and scheduler from a directory written by `save` (with the same number of
        ranks or another: torch.distributed.checkpoint reshards)."""
        from torch.distributed.checkpoint.state_dict import set_state_dict
        options = self._state_dict_options()
        policy_state, optimizer_state = self._sharded_state_dicts(options)
        state = {'policy': policy_state, 'optimizer': optimizer_state}
        checkpoints.load_sharded(checkpoint_dir, state, self.config.trust_checkpoint_code)
        result = set_state_dict(self.policy, self.optimizer, model_state_dict=state['policy'],
                                optim_state_dict=state['optimizer'], options=options)
        lora.check_loaded_keys(self.policy, result.missing_keys, result.unexpected_keys, f'{checkpoint_dir}/sharded')
        self.scheduler.load_state_dict(checkpoints.load_state(os.path.join(checkpoint_dir, 'scheduler.pt'),
                                                              self.config.trust_checkpoint_code))


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

    @classmethod
    def policy_compute_dtype(cls, model_config: DictConfig) -> str:
        return model_config.fsdp_policy_mp or model_config.policy_dtype

    def wrap_models(self, policy, reference_model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = _device_mesh(self.world_size)
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

    def final_hidden_states(self, model, inputs: Dict) -> torch.Tensor:
        """Through the root module, whose FSDP hooks unshard embeddings, final norm and output layer (the
        decoder alone would skip them); FSDP2 keeps the root unsharded until backward ends, so
        `token_stats.output_head` then reads the full weight. The head runs on one position only."""
        captured = []
        hook = model.get_decoder().register_forward_hook(lambda module, args, out: captured.append(out.last_hidden_state))
        forward = lora.base_model(model).forward  # a LoRA policy passes the keyword on to its transformers model
        head_positions = {'logits_to_keep': 1} if 'logits_to_keep' in inspect.signature(forward).parameters else {}
        try:
            model(**inputs, use_cache=False, **head_positions)
        finally:
            hook.remove()
        return captured[0]


class TensorParallelTrainer(ShardedTrainer):
    """Tensor parallelism (PyTorch-native, DTensor): each rank holds a slice of every attention and MLP
    weight (transformers' `base_model_tp_plan`: column-wise, then row-wise with one all-reduce), and all
    ranks compute on the whole batch together. Launch with torchrun, one process per GPU of a node."""
    splits_batches = False
    supports_lora = False  # the plan's column- and row-wise styles apply to nn.Linear, not to peft's LoRA layers

    def wrap_models(self, policy, reference_model):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
        mesh = _device_mesh(self.world_size)
        device = distributed.default_device()
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


TRAINERS = {cls.__name__: cls for cls in (BasicTrainer, FSDPTrainer, TensorParallelTrainer)}
