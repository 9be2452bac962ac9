"""Entry point: `python -u train.py model=... datasets=[...] loss=sft|tdpo|dpo|ipo exp_name=...`.

Composes config/ with Hydra, checks it, writes the resolved config into a new run directory, builds
policy and reference models, and hands them to the trainer class named by `trainer`.
"""
import json
import os
import socket
import sys

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import preference_datasets
import trainers
import utils

OmegaConf.register_new_resolver('get_local_run_dir', utils.get_local_run_dir, replace=True)
OmegaConf.register_new_resolver('pkg_dir', utils.package_dir, replace=True)

TRAINERS = {'BasicTrainer': trainers.BasicTrainer}
PREFERENCE_LOSSES = ('tdpo', 'dpo', 'ipo')


class ConfigError(ValueError):
    """A bad configuration; the message names the key."""


def missing_keys(config: DictConfig, prefix: str = '') -> list:
    """Dotted names of every `???` key, without resolving interpolations (which would fail on them)."""
    keys = []
    for key in config.keys():  # mappings only; no list in our configs is mandatory
        if OmegaConf.is_missing(config, key):
            keys.append(prefix + str(key))
        elif OmegaConf.is_dict(config._get_node(key)):
            keys += missing_keys(config[key], f'{prefix}{key}.')
    return keys


def check_config(config: DictConfig, world_size: int = 1):
    """Fail before any model is loaded, naming every missing key or the key that is wrong."""
    missing = missing_keys(config)
    if missing:
        raise ConfigError('missing required config keys (set them on the command line, e.g. exp_name=my_run): '
                          + ', '.join(missing))
    if config.trainer not in TRAINERS:
        raise ConfigError(f'unknown trainer={config.trainer!r}; valid: {", ".join(TRAINERS)}')
    if config.loss.name != 'sft' and config.loss.name not in PREFERENCE_LOSSES:
        raise ConfigError(f'unknown loss.name={config.loss.name!r}; valid: sft, {", ".join(PREFERENCE_LOSSES)}')
    if config.batch_size % (config.gradient_accumulation_steps * world_size):
        raise ConfigError(f'batch_size={config.batch_size} must be divisible by gradient_accumulation_steps '
                          f'({config.gradient_accumulation_steps}) x world size ({world_size})')
    if not 0 < config.max_prompt_length < config.max_length:
        raise ConfigError(f'need 0 < max_prompt_length ({config.max_prompt_length}) < max_length ({config.max_length})')
    if 'beta' in config.loss and not config.loss.beta > 0:
        raise ConfigError(f'loss.beta must be positive, got {config.loss.beta}')
    if config.n_epochs is None and config.n_examples is None:
        raise ConfigError('set n_epochs or n_examples (both are null)')
    if config.eval_every < config.batch_size:
        raise ConfigError(f'eval_every={config.eval_every} is smaller than batch_size={config.batch_size}')


def build_models(config: DictConfig, device_map=None):
    """Policy, and for preference losses a frozen reference; both get `model.archive` weights if set."""
    cache_dir = utils.get_local_dir(config.local_dirs)
    policy = utils.load_model(config.model, config.model.policy_dtype, cache_dir, device_map=device_map)
    reference_model = None
    if config.loss.name in PREFERENCE_LOSSES:
        reference_model = utils.load_model(config.model, config.model.reference_dtype, cache_dir, device_map=device_map)
        reference_model.requires_grad_(False)
        reference_model.eval()
    if config.model.archive is not None:
        archive = torch.load(config.model.archive, map_location='cpu', weights_only=False)
        print(f"loading weights at step {archive['step_idx']} from {config.model.archive} "
              f"with metrics {json.dumps(archive['metrics'], indent=2)}")
        for model in (policy, reference_model):
            if model is not None:
                model.load_state_dict(archive['state'])
    return policy, reference_model


def init_wandb(config: DictConfig):
    import wandb
    mode = 'disabled' if config.debug or not config.wandb.enabled else utils.wandb_mode()
    if mode == 'offline':
        print('wandb: no credentials or no network; logging offline to a local run '
              '(upload later with `wandb sync`)', flush=True)
    if mode != 'disabled':
        wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name, mode=mode,
                   config=OmegaConf.to_container(config), dir=config.local_run_dir)


def worker_main(rank: int, world_size: int, config: DictConfig, policy, reference_model=None):
    if rank == 0:
        init_wandb(config)
    trainer = TRAINERS[config.trainer](policy, config, config.seed, config.local_run_dir,
                                      reference_model=reference_model, rank=rank, world_size=world_size)
    trainer.train()
    if not config.debug:
        trainer.save()
        trainer.export_hf()
    if rank == 0:
        import wandb
        if wandb.run is not None:
            wandb.finish()
    print(f'run directory: {config.local_run_dir}', flush=True)


@hydra.main(version_base=None, config_path='config', config_name='config')
def main(config: DictConfig):
    try:
        check_config(config)
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    OmegaConf.resolve(config)
    if config.eval_every % config.batch_size:
        config.eval_every -= config.eval_every % config.batch_size
    print(OmegaConf.to_yaml(config))
    os.makedirs(config.local_run_dir, exist_ok=True)
    with open(os.path.join(config.local_run_dir, 'config.yaml'), 'w') as f:
        OmegaConf.save(config, f)
    print('=' * 80 + f'\nWriting to {socket.gethostname()}:{config.local_run_dir}\n' + '=' * 80, flush=True)
    device_map = 'balanced' if torch.cuda.device_count() > 1 else None
    policy, reference_model = build_models(config, device_map=device_map)
    try:
        worker_main(0, 1, config, policy, reference_model)
    except preference_datasets.DataError as e:
        sys.exit(f'data error: {e}')


if __name__ == '__main__':
    main()
