"""Run configuration: the config a run has and whether it is valid, decided before anything is loaded or written.
Here belong the OmegaConf resolvers that config/ uses (registered once, when this module is imported),
`compose_config` (the config `python train.py <overrides>` runs with), `ConfigError`, and every check of a
composed config with the tables of valid values it checks against. It imports no trainer: the checks that need the
trainer classes get their registry from the caller (`check_config`), so that any module may import this one."""
import os
from typing import Optional

from omegaconf import DictConfig, OmegaConf

import checkpoints
import model_loading
import pair_layout
import token_stats
import utils

OmegaConf.register_new_resolver('get_local_run_dir', utils.get_local_run_dir, replace=True)
OmegaConf.register_new_resolver('pkg_dir', model_loading.package_dir, replace=True)


def compose_config(overrides) -> DictConfig:
    """The config that `python train.py <overrides>` runs with (Hydra's compose API on the same config/),
    for tools that need it without running (`python preference_datasets.py`)."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config'),
                               version_base=None):
        return compose('config', overrides=list(overrides))


DTYPES = ('float32', 'bfloat16', 'float16')  # model.policy_dtype, model.reference_dtype, model.fsdp_policy_mp
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


# Numeric keys and their valid values. A value outside them would crash later (batch_size=0 divides by zero)
# or train on nothing (n_examples=-4, n_epochs=0). Whole numbers: key -> (least, greatest or None, null allowed).
WHOLE_NUMBER_KEYS = {
    'batch_size': (1, None, False), 'eval_batch_size': (1, None, False), 'gradient_accumulation_steps': (1, None, False),
    'n_epochs': (1, None, True), 'n_examples': (1, None, True), 'n_eval_examples': (0, None, True),
    'n_eval_model_samples': (0, None, False), 'warmup_steps': (0, None, False), 'max_length': (1, None, False),
    'max_prompt_length': (1, None, False), 'eval_every': (1, None, False), 'checkpoint_every': (1, None, True),
    'keep_checkpoints': (1, None, True), 'max_nonfinite_updates': (1, None, False), 'seed': (0, 2**32 - 1, False),
    'fsdp_port': (1, 65535, True),
}
# Real numbers: key -> (test, what passes it); a loss.* key is checked where the chosen loss has it.
REAL_KEYS = {
    'lr': (lambda v: v > 0, 'a positive number'), 'max_grad_norm': (lambda v: v > 0, 'a positive number'),
    'eval_fraction': (lambda v: 0 <= v < 1, 'a number in [0, 1)'), 'loss.beta': (lambda v: v > 0, 'a positive number'),
    'loss.alpha': (lambda v: v >= 0, 'a number >= 0'),
    'loss.label_smoothing': (lambda v: 0 <= v < 0.5, 'a number in [0, 0.5)'),
}
OPTIMIZERS = ('RMSprop', 'AdamW', 'Adam', 'SGD')  # torch.optim classes


def is_number(value, whole: bool = False) -> bool:
    return isinstance(value, int if whole else (int, float)) and not isinstance(value, bool)


def shown(value) -> str:
    """A value as the user writes it on the command line."""
    return 'null' if value is None else repr(value)


def check_numbers(config: DictConfig):
    """Every numeric key holds a number in its range."""
    for key, (least, greatest, nullable) in WHOLE_NUMBER_KEYS.items():
        value = config[key]
        if value is None and nullable:
            continue
        if not is_number(value, whole=True) or value < least or (greatest is not None and value > greatest):
            valid = f'{least}..{greatest}' if greatest is not None else f'>= {least}'
            raise ConfigError(f'{key} must be {"null or " if nullable else ""}a whole number {valid}, got {shown(value)}')
    for key, (valid, what) in REAL_KEYS.items():
        if key.startswith('loss.') and key[len('loss.'):] not in config.loss:
            continue
        value = OmegaConf.select(config, key)
        if not (is_number(value) and valid(value)):
            raise ConfigError(f'{key} must be {what}, got {shown(value)}')


def check_config(config: DictConfig, world_size: int = 1, trainers: Optional[dict] = None):
    """Fail before any model is loaded, naming every missing key or the key that is wrong.
    world_size: the number of processes the run will have. trainers: the trainer registry, name -> class with
    `distributed`, `splits_batches` and `supports_lora` (train.py passes sharded_trainers.TRAINERS). Without it
    (`python preference_datasets.py`, which builds no trainer) the trainer-specific checks are skipped: that
    `trainer` names a trainer, that a one-process trainer gets one process, and that the trainer trains LoRA;
    the batch sizes are then checked against one data-parallel rank."""
    missing = missing_keys(config)
    if missing:
        raise ConfigError('missing required config keys (set them on the command line, e.g. exp_name=my_run): '
                          + ', '.join(missing))
    if trainers is not None and config.trainer not in trainers:
        raise ConfigError(f'unknown trainer={config.trainer!r}; valid: {", ".join(trainers)}')
    if config.loss.name != 'sft' and config.loss.name not in PREFERENCE_LOSSES:
        raise ConfigError(f'unknown loss.name={config.loss.name!r}; valid: sft, {", ".join(PREFERENCE_LOSSES)}')
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f'unknown optimizer={config.optimizer!r}; valid: {", ".join(OPTIMIZERS)}')
    if config.loss.get('divergence', 'reverse_kl') not in ('reverse_kl', 'forward_kl'):
        raise ConfigError(f'unknown loss.divergence={config.loss.divergence!r}; valid: reverse_kl, forward_kl')
    check_numbers(config)
    for key, allowed in (('model.policy_dtype', DTYPES), ('model.fsdp_policy_mp', (None, *DTYPES)),
                         ('model.reference_dtype', (None, *DTYPES))):
        if OmegaConf.select(config, key) not in allowed:
            raise ConfigError(f'{key}={OmegaConf.select(config, key)!r}; valid: {", ".join(map(str, allowed))}')
    for key in ['datasets', 'local_dirs'] + (['eval_datasets'] if config.eval_datasets is not None else []):
        if not (OmegaConf.is_list(config[key]) and len(config[key]) > 0):
            raise ConfigError(f'{key} must be a non-empty list (e.g. {key}=[a,b]), got {shown(config[key])}')
    trainer_class = trainers[config.trainer] if trainers is not None else None
    if trainer_class is not None and world_size > 1 and not trainer_class.distributed:
        raise ConfigError(f'trainer={config.trainer} runs in one process, not {world_size}: use '
                          f'{", ".join(name for name, cls in trainers.items() if cls.distributed)}')
    data_parallel = world_size if trainer_class is not None and trainer_class.splits_batches else 1
    if config.batch_size % (config.gradient_accumulation_steps * data_parallel):
        raise ConfigError(f'batch_size={config.batch_size} must be divisible by gradient_accumulation_steps '
                          f'({config.gradient_accumulation_steps}) x world size ({data_parallel})')
    if config.eval_batch_size % data_parallel:
        raise ConfigError(f'eval_batch_size={config.eval_batch_size} must be divisible by the world size ({data_parallel})')
    if not config.max_prompt_length < config.max_length:
        raise ConfigError(f'need 0 < max_prompt_length ({config.max_prompt_length}) < max_length ({config.max_length})')
    if config.n_epochs is None and config.n_examples is None:
        raise ConfigError('set n_epochs or n_examples (both are null)')
    for key in ('n_examples', 'eval_every', 'checkpoint_every'):  # n_examples: whole batches only
        if config[key] is not None and config[key] < config.batch_size:
            raise ConfigError(f'{key}={config[key]} is smaller than batch_size={config.batch_size}')
    if config.stats_impl not in token_stats.STATS_IMPLS:
        raise ConfigError(f'stats_impl={config.stats_impl!r}; valid: {", ".join(token_stats.STATS_IMPLS)}')
    if config.pair_layout not in pair_layout.PAIR_LAYOUTS:
        raise ConfigError(f'pair_layout={config.pair_layout!r}; valid: {", ".join(pair_layout.PAIR_LAYOUTS)}')
    if config.finished_run_keeps not in checkpoints.FINISHED_RUN_KEEPS:
        raise ConfigError(f'finished_run_keeps={config.finished_run_keeps!r}; valid: {", ".join(checkpoints.FINISHED_RUN_KEEPS)}')
    if config.on_bad_example not in ('error', 'skip'):
        raise ConfigError(f"on_bad_example={config.on_bad_example!r}; valid: error, skip")
    check_lora_config(config.lora, trainer_class, trainers)


def check_lora_config(lora_config: DictConfig, trainer_class=None, trainers: Optional[dict] = None):
    """The lora.* keys (LoRA: adapters on a frozen policy; null lora.r = full fine-tuning); whether the trainer
    trains LoRA only with its class and the registry (`check_config`'s trainers)."""
    if lora_config.r is None:
        return
    if isinstance(lora_config.r, bool) or not isinstance(lora_config.r, int) or lora_config.r < 1:
        raise ConfigError(f'lora.r must be null (full fine-tuning) or a positive integer, got {lora_config.r!r}')
    if not lora_config.alpha > 0:
        raise ConfigError(f'lora.alpha must be positive, got {lora_config.alpha}')
    if not 0 <= lora_config.dropout < 1:
        raise ConfigError(f'lora.dropout must be in [0, 1), got {lora_config.dropout}')
    if not lora_config.target_modules:
        raise ConfigError('lora.target_modules is empty: name module names (e.g. [q_proj,v_proj]) or all-linear')
    if trainer_class is not None and not trainer_class.supports_lora:
        raise ConfigError(f'lora.r: trainer={trainer_class.__name__} does not train LoRA adapters; use '
                          f'{", ".join(name for name, cls in trainers.items() if cls.supports_lora)}')
