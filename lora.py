"""LoRA: train low-rank adapters on a frozen policy, through the `peft` library.

Why a module of its own: with `lora.r` set, train.py wraps the loaded policy here, no reference model
is loaded (the reference is the same weights with the adapters disabled: `adapters_disabled`, used by
the trainer's `reference_forward` hook), checkpoints hold only the adapter, and the end of a run exports
the adapter (`PeftModel.from_pretrained` loads it) and the policy with the adapter merged into its
weights (`AutoModelForCausalLM.from_pretrained` loads it). `merged_state_dict` is a pure function of a
state dict, so that it works on a policy gathered from FSDP shards as on a local one.

Every adapted weight W (out × in) of the base becomes W + (α / r)·B A with A (r × in), B (out × r);
B starts at 0, so before training the policy equals the reference exactly.
"""
import contextlib
import os
import sys
import warnings
from typing import Dict, Optional

import torch
from omegaconf import DictConfig

ADAPTER = 'default'        # peft's name of our one adapter; it appears in the policy's state-dict keys
PEFT_PREFIX = 'base_model.model.'  # a PeftModel's state-dict keys: this prefix, then the base model's keys
ADAPTER_EXPORT_DIR = 'adapter'     # <run dir>/adapter: the adapter in peft's format, beside the merged hf/


def enabled(lora_config: Optional[DictConfig]) -> bool:
    """Whether a run trains LoRA adapters (`lora.r` set); None (a run from before LoRA existed): no."""
    return lora_config is not None and lora_config.get('r') is not None


def wrap(model: torch.nn.Module, lora_config: DictConfig, seed: int, base_name_or_path: Optional[str] = None):
    """The loaded `model` (frozen from here on) with fresh LoRA adapters on `lora.target_modules`, as a
    peft PeftModel. A is initialised from `seed` (the same on every rank), B = 0.
    base_name_or_path: recorded in the exported adapter_config.json; None when no model directory or hub
    id holds the base weights (a random init, or model.archive weights): then it is recorded as ''."""
    import peft
    targets = lora_config.target_modules
    config = peft.LoraConfig(r=lora_config.r, lora_alpha=lora_config.alpha, lora_dropout=lora_config.dropout,
                             target_modules=targets if isinstance(targets, str) else list(targets),
                             task_type='CAUSAL_LM', bias='none')
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*is_gradient_checkpointing.*')  # transformers 5 deprecation, inside peft
        torch.manual_seed(seed)
        policy = peft.get_peft_model(model, config)
    adapted = [name for name, module in policy.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)]
    unmatched = [t for t in ([] if isinstance(targets, str) else targets)
                 if not any(name == t or name.endswith('.' + t) for name in adapted)]
    if unmatched:  # peft only fails when no name matches; a typo in one of several would go unnoticed
        raise ValueError(f'lora.target_modules: no module of {type(model).__name__} is named {", ".join(unmatched)}')
    if isinstance(policy.get_output_embeddings(), peft.tuners.lora.LoraLayer) and \
            getattr(model.config.get_text_config(), 'tie_word_embeddings', False):
        raise ValueError(f'lora.target_modules={targets} adapts the output layer, which this model ties to its input '
                         f'embedding: the merged export could not hold both; leave the output layer out')
    # peft would record the model files' path, wrong for a random init or a model.archive on top of them
    policy.peft_config[ADAPTER].base_model_name_or_path = base_name_or_path or ''
    return policy


def is_lora(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft PeftModel; without importing peft (3 s) in runs that never did."""
    peft = sys.modules.get('peft')
    return peft is not None and isinstance(model, peft.PeftModel)


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel (its adapted layers included), or `model` itself.
    FSDP's root unit goes here: PeftModel.generate() calls the base model, not the PeftModel's forward."""
    return model.get_base_model() if is_lora(model) else model


@contextlib.contextmanager
def adapters_disabled(policy: torch.nn.Module):
    """The policy computes as its base model inside this block: the LoRA reference."""
    with policy.disable_adapter():
        yield policy


def frozen_names(model: torch.nn.Module) -> set:
    """State-dict names of the frozen parameters (with LoRA: every base weight; in full fine-tuning: none),
    tied ones under each of their names."""
    return {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}


def trainable_state(model: torch.nn.Module, state: Dict) -> Dict:
    """A state dict of `model` without the frozen weights: what checkpoints hold (with LoRA: the adapter)."""
    frozen = frozen_names(model)
    return {k: v for k, v in state.items() if k not in frozen}


def check_loaded_keys(model: torch.nn.Module, missing, unexpected, what: str):
    """After load_state_dict(strict=False) of trainable weights only: every key known, and only frozen ones
    left out (they come from the model files, not from the checkpoint)."""
    missing = set(missing) - frozen_names(model)
    if missing or unexpected:
        raise RuntimeError(f'{what} does not fit this policy: missing {sorted(missing)[:5]} ({len(missing)}), '
                           f'unexpected {sorted(unexpected)[:5]} ({len(unexpected)}); was it written with the same '
                           f'model and lora.* settings?')


def holds_adapter(state: Dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's policy state is a LoRA adapter (not full weights)."""
    return any('.lora_A.' in key for key in state)


def merged_state_dict(state: Dict[str, torch.Tensor], scaling: float, fan_in_fan_out: bool = False
                      ) -> Dict[str, torch.Tensor]:
    """A PeftModel's full state dict (base weights and adapter; keys `base_model.model.<key>`, adapted
    layers as `<module>.base_layer.weight`, `<module>.lora_A.default.weight`, `<module>.lora_B.default.weight`)
    -> the base model's state dict (plain `<key>`s) with every adapted weight W replaced by
    W + scaling·B A, computed in float32 and stored in W's dtype. fan_in_fan_out: the base layers store
    W transposed (GPT-2's Conv1D)."""
    merged = {}
    for key, value in state.items():
        if '.lora_A.' in key or '.lora_B.' in key:
            continue
        assert key.startswith(PEFT_PREFIX), key
        name = key[len(PEFT_PREFIX):]
        if '.base_layer.' in name:
            module, param = key.rsplit('.base_layer.', 1)
            if param == 'weight':
                lora_a, lora_b = (state[f'{module}.lora_{x}.{ADAPTER}.weight'].float() for x in 'AB')
                delta = scaling * (lora_b @ lora_a)
                value = (value.float() + (delta.T if fan_in_fan_out else delta)).to(value.dtype)
            name = name.replace('.base_layer.', '.')
        merged[name] = value
    return merged


def export(policy, full_state: Dict[str, torch.Tensor], run_dir: str, tokenizer, hf_dir: Optional[str] = None):
    """Write the adapter to <run_dir>/adapter (PeftModel.from_pretrained(base, dir) loads it) and the merged
    policy to hf_dir (default <run_dir>/hf; AutoModelForCausalLM.from_pretrained loads it), each with the
    tokenizer. full_state: the policy's whole state dict (gathered, on a sharded policy)."""
    config = policy.peft_config[ADAPTER]
    adapter_dir = os.path.join(run_dir, ADAPTER_EXPORT_DIR)
    policy.save_pretrained(adapter_dir, state_dict=full_state)
    tokenizer.save_pretrained(adapter_dir)
    hf_dir = hf_dir or os.path.join(run_dir, 'hf')
    merged = merged_state_dict(full_state, config.lora_alpha / config.r, config.fan_in_fan_out)
    base_model(policy).save_pretrained(hf_dir, state_dict=merged)
    tokenizer.save_pretrained(hf_dir)
    return adapter_dir, hf_dir


def load_trainable_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], what: str):
    """Load what `trainable_state` gave (what checkpoints hold: with LoRA the adapter, else every weight)
    into `model`, checking every key."""
    result = model.load_state_dict(state, strict=False)
    check_loaded_keys(model, result.missing_keys, result.unexpected_keys, what)
