"""Model loading and export: the models a run starts from, as train.py builds them: the policy, the frozen
reference for preference losses, `model.archive` weights loaded into them, LoRA adapters on the policy, and where
the base weights came from (recorded with an exported adapter). Loading one model or tokenizer from its source
(hub, local directory, GGUF, random init) is model_loading.load_model and model_loading.load_tokenizer. No trainer
is imported here: the caller passes the class of the trainer that will train the models."""
import json
import os
from typing import Optional

from omegaconf import DictConfig

import checkpoints
import lora
import model_loading
import utils
from run_config import PREFERENCE_LOSSES, ConfigError


def build_models(config: DictConfig, trainer_class, device_map=None):
    """Policy, and for preference losses a frozen reference (in `model.reference_dtype`, null: the dtype
    the policy computes in under `trainer_class`, the trainer that will train them); both get `model.archive`
    weights if set. With LoRA (lora.r set) the policy gets adapters and no reference is loaded: the reference
    is the policy with its adapters disabled."""
    cache_dir = utils.get_local_dir(config.local_dirs)
    policy = model_loading.load_model(config.model, config.model.policy_dtype, cache_dir, device_map=device_map)
    reference_model = None
    if config.loss.name in PREFERENCE_LOSSES and not lora.enabled(config.lora):
        reference_dtype = trainer_class.reference_dtype(config.model)
        utils.rank0_print(f'reference model in {reference_dtype}')
        reference_model = model_loading.load_model(config.model, reference_dtype, cache_dir, device_map=device_map)
        reference_model.requires_grad_(False)
        reference_model.eval()
    if config.model.archive is not None:
        archive = checkpoints.load_archive(config.model.archive, config.trust_checkpoint_code, mmap=True)
        print(f"loading weights at step {archive.get('step_idx')} from {config.model.archive} "
              f"with metrics {json.dumps(archive.get('metrics'), indent=2, default=str)}")
        if lora.holds_adapter(archive['state']):
            raise ConfigError(f'model.archive={config.model.archive} holds a LoRA adapter, not full weights: use '
                              f'that run\'s merged export instead, model.name_or_path=<run dir>/hf')
        for model in (policy, reference_model):
            if model is not None:
                load_archive_weights(model, archive['state'], config)
    if lora.enabled(config.lora):
        try:
            policy = lora.wrap(policy, config.lora, config.seed, base_name_or_path=base_model_path(config, cache_dir))
        except ValueError as e:  # e.g. peft: target modules not found in the model
            raise ConfigError(f'lora: {e}') from e
    return policy, reference_model


def load_archive_weights(model, state: dict, config: DictConfig):
    """model.archive's weights into `model`; weights that do not fit the model are one ConfigError."""
    try:
        model_loading.load_weights(model, state, f'model.archive={config.model.archive}', config.model.name_or_path)
    except model_loading.WeightsMismatch as e:
        raise ConfigError(str(e)) from None


def base_model_path(config: DictConfig, cache_dir: str) -> Optional[str]:
    """Where the policy's initial weights can be loaded from (hub id or directory), recorded in the exported
    LoRA adapter; None when no such place exists (random init, or model.archive weights)."""
    if config.model.random_init or config.model.archive:
        return None
    source = model_loading.resolve_model_source(config.model, cache_dir)
    return os.path.abspath(source) if os.path.exists(source) else source
