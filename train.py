"""Entry point: `python -u train.py model=... datasets=[...] loss=sft|tdpo|dpo|ipo exp_name=...`.

Composes config/ with Hydra, checks it, writes the resolved config into a new run directory, builds
policy and reference models, and hands them to the trainer class named by `trainer`. A distributed
trainer runs one process per local GPU (spawned here), or one per process that torchrun starts.
"""
import json
import os
import socket
import subprocess
import sys
from typing import Optional

import hydra
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

import lora
import preference_datasets
import token_stats
import trainers
import utils

OmegaConf.register_new_resolver('get_local_run_dir', utils.get_local_run_dir, replace=True)
OmegaConf.register_new_resolver('pkg_dir', utils.package_dir, replace=True)

TRAINERS = {cls.__name__: cls for cls in (trainers.BasicTrainer, trainers.FSDPTrainer, trainers.TensorParallelTrainer)}
PREFERENCE_LOSSES = ('tdpo', 'dpo', 'ipo')
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; resume=true continues


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
    """Fail before any model is loaded, naming every missing key or the key that is wrong.
    world_size: the number of processes the run will have."""
    missing = missing_keys(config)
    if missing:
        raise ConfigError('missing required config keys (set them on the command line, e.g. exp_name=my_run): '
                          + ', '.join(missing))
    if config.trainer not in TRAINERS:
        raise ConfigError(f'unknown trainer={config.trainer!r}; valid: {", ".join(TRAINERS)}')
    if config.loss.name != 'sft' and config.loss.name not in PREFERENCE_LOSSES:
        raise ConfigError(f'unknown loss.name={config.loss.name!r}; valid: sft, {", ".join(PREFERENCE_LOSSES)}')
    trainer_class = TRAINERS[config.trainer]
    if world_size > 1 and not trainer_class.distributed:
        raise ConfigError(f'trainer={config.trainer} runs in one process, not {world_size}: use '
                          f'{", ".join(name for name, cls in TRAINERS.items() if cls.distributed)}')
    data_parallel = world_size if trainer_class.splits_batches else 1
    if config.batch_size % (config.gradient_accumulation_steps * data_parallel):
        raise ConfigError(f'batch_size={config.batch_size} must be divisible by gradient_accumulation_steps '
                          f'({config.gradient_accumulation_steps}) x world size ({data_parallel})')
    if config.eval_batch_size % data_parallel:
        raise ConfigError(f'eval_batch_size={config.eval_batch_size} must be divisible by the world size ({data_parallel})')
    if not 0 < config.max_prompt_length < config.max_length:
        raise ConfigError(f'need 0 < max_prompt_length ({config.max_prompt_length}) < max_length ({config.max_length})')
    if 'beta' in config.loss and not config.loss.beta > 0:
        raise ConfigError(f'loss.beta must be positive, got {config.loss.beta}')
    if config.n_epochs is None and config.n_examples is None:
        raise ConfigError('set n_epochs or n_examples (both are null)')
    for key in ('eval_every', 'checkpoint_every'):
        if config[key] is not None and config[key] < config.batch_size:
            raise ConfigError(f'{key}={config[key]} is smaller than batch_size={config.batch_size}')
    if config.keep_checkpoints is not None and config.keep_checkpoints < 1:
        raise ConfigError(f'keep_checkpoints must be null or >= 1, got {config.keep_checkpoints}')
    if config.max_nonfinite_updates < 1:
        raise ConfigError(f'max_nonfinite_updates must be >= 1, got {config.max_nonfinite_updates}')
    if config.stats_impl not in token_stats.STATS_IMPLS:
        raise ConfigError(f'stats_impl={config.stats_impl!r}; valid: {", ".join(token_stats.STATS_IMPLS)}')
    if config.on_bad_example not in ('error', 'skip'):
        raise ConfigError(f"on_bad_example={config.on_bad_example!r}; valid: error, skip")
    check_lora_config(config.lora, trainer_class)


def check_lora_config(lora_config: DictConfig, trainer_class):
    """The lora.* keys (LoRA: adapters on a frozen policy; null lora.r = full fine-tuning)."""
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
    if not trainer_class.supports_lora:
        raise ConfigError(f'lora.r: trainer={trainer_class.__name__} does not train LoRA adapters; use '
                          f'{", ".join(name for name, cls in TRAINERS.items() if cls.supports_lora)}')


def build_models(config: DictConfig, device_map=None):
    """Policy, and for preference losses a frozen reference; both get `model.archive` weights if set.
    With LoRA (lora.r set) the policy gets adapters and no reference is loaded: the reference is the
    policy with its adapters disabled."""
    cache_dir = utils.get_local_dir(config.local_dirs)
    policy = utils.load_model(config.model, config.model.policy_dtype, cache_dir, device_map=device_map)
    reference_model = None
    if config.loss.name in PREFERENCE_LOSSES and not lora.enabled(config.lora):
        reference_model = utils.load_model(config.model, config.model.reference_dtype, cache_dir, device_map=device_map)
        reference_model.requires_grad_(False)
        reference_model.eval()
    if config.model.archive is not None:
        archive = torch.load(config.model.archive, map_location='cpu', weights_only=False)
        print(f"loading weights at step {archive['step_idx']} from {config.model.archive} "
              f"with metrics {json.dumps(archive['metrics'], indent=2)}")
        if lora.holds_adapter(archive['state']):
            raise ConfigError(f'model.archive={config.model.archive} holds a LoRA adapter, not full weights: use '
                              f'that run\'s merged export instead, model.name_or_path=<run dir>/hf')
        for model in (policy, reference_model):
            if model is not None:
                model.load_state_dict(archive['state'])
    if lora.enabled(config.lora):
        try:
            policy = lora.wrap(policy, config.lora, config.seed, base_name_or_path=base_model_path(config, cache_dir))
        except ValueError as e:  # e.g. peft: target modules not found in the model
            raise ConfigError(f'lora: {e}') from e
    return policy, reference_model


def base_model_path(config: DictConfig, cache_dir: str) -> Optional[str]:
    """Where the policy's initial weights can be loaded from (hub id or directory), recorded in the exported
    LoRA adapter; None when no such place exists (random init, or model.archive weights)."""
    if config.model.random_init or config.model.archive:
        return None
    source = utils.resolve_model_source(config.model, cache_dir)
    return os.path.abspath(source) if os.path.exists(source) else source


def init_wandb(config: DictConfig, run_id: Optional[str] = None):
    """wandb as the reference uses it; offline when there are no credentials or no network; a resumed
    run continues its wandb run."""
    import wandb
    mode = 'disabled' if config.debug or not config.wandb.enabled else utils.wandb_mode()
    if mode == 'offline':
        print('wandb: no credentials or no network; logging offline to a local run '
              '(upload later with `wandb sync`)', flush=True)
    if mode != 'disabled':
        wandb.init(entity=config.wandb.entity, project=config.wandb.project, name=config.exp_name, mode=mode,
                   config=OmegaConf.to_container(config), dir=config.local_run_dir, id=run_id,
                   resume='allow' if run_id else None)


def resume_checkpoint(config: DictConfig) -> Optional[str]:
    """The checkpoint to continue from, with config.local_run_dir set to its run directory; None for a
    new run. Call before the config is resolved."""
    if config.resume_from:
        checkpoint = os.path.abspath(config.resume_from)
        if not os.path.exists(os.path.join(checkpoint, utils.CHECKPOINT_STATE)):
            raise ConfigError(f'resume_from={config.resume_from}: not a complete checkpoint directory '
                              f'(no {utils.CHECKPOINT_STATE})')
        config.local_run_dir = os.path.dirname(checkpoint)
        return checkpoint
    if not config.resume:
        return None
    # the default local_run_dir is a new timestamped directory; one the user set (it may interpolate other
    # keys, e.g. runs/beta${loss.beta} in a sweep) names the run directory to continue
    if str(OmegaConf.to_container(config, resolve=False)['local_run_dir']).startswith('${get_local_run_dir:'):
        run_dir = utils.newest_run_dir(config.exp_name, config.local_dirs)
        if run_dir is None:
            print(f'resume=true: no checkpoint of {config.exp_name} yet; starting a new run', flush=True)
            return None
        config.local_run_dir = run_dir
    checkpoint = utils.latest_checkpoint(config.local_run_dir)
    if checkpoint is None:
        print(f'resume=true: no checkpoint in {config.local_run_dir} yet; starting from the beginning', flush=True)
    return checkpoint


def requeue_slurm_job():
    """Under Slurm, put this job back in the queue; with resume=true it continues where it stopped."""
    job_id = os.environ.get('SLURM_JOB_ID')
    if job_id:
        print(f'requeueing Slurm job {job_id}', flush=True)
        subprocess.run(['scontrol', 'requeue', job_id], check=False)


def prepare_run_dir(config: DictConfig, rank: int):
    """Resolve the config; every rank takes rank 0's run directory (processes started separately, as by
    torchrun, resolve different timestamps); rank 0 creates it and writes config.yaml there."""
    OmegaConf.resolve(config)
    if dist.is_initialized():
        run_dir = [config.local_run_dir]
        dist.broadcast_object_list(run_dir, src=0)
        config.local_run_dir = run_dir[0]
    for key in ('eval_every', 'checkpoint_every'):  # whole batches
        if config[key] and config[key] % config.batch_size:
            config[key] -= config[key] % config.batch_size
    if rank == 0:
        print(OmegaConf.to_yaml(config))
        os.makedirs(config.local_run_dir, exist_ok=True)
        with open(os.path.join(config.local_run_dir, 'config.yaml'), 'w') as f:
            OmegaConf.save(config, f)
        print('=' * 80 + f'\nWriting to {socket.gethostname()}:{config.local_run_dir}\n' + '=' * 80, flush=True)


def worker_main(rank: int, world_size: int, config: DictConfig, resume_from: Optional[str] = None):
    """One process of the run (the only one for BasicTrainer): builds its models, trains (or continues
    `resume_from`), saves."""
    trainer_class = TRAINERS[config.trainer]
    if trainer_class.distributed:
        utils.init_distributed(rank, world_size)
    prepare_run_dir(config, rank)
    # BasicTrainer spreads one model over all local GPUs; a distributed trainer gives each rank one GPU
    device_map = 'balanced' if torch.cuda.device_count() > 1 and not trainer_class.distributed else None
    try:
        policy, reference_model = build_models(config, device_map=device_map)
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    run_id = torch.load(os.path.join(resume_from, utils.CHECKPOINT_STATE), weights_only=False)['wandb_id'] \
        if resume_from else None
    if rank == 0:
        init_wandb(config, run_id)
    try:
        trainer = trainer_class(policy, config, config.seed, config.local_run_dir,
                                reference_model=reference_model, rank=rank, world_size=world_size)
        if resume_from:
            trainer.load_training_state(resume_from)
        elif rank == 0 and os.path.exists(trainer.metrics_path):
            os.remove(trainer.metrics_path)  # a new start in a reused run directory
        trainer.train()
    except preference_datasets.DataError as e:
        sys.exit(f'data error: {e}')
    except trainers.NonFiniteError as e:
        sys.exit(f'training stopped: {e}')
    except trainers.Preempted as e:
        print(e, flush=True)
        if rank == 0:
            requeue_slurm_job()
        sys.exit(PREEMPTED_EXIT_CODE)
    finally:
        import wandb
        if rank == 0 and wandb.run is not None:
            wandb.finish()
    if not config.debug:
        trainer.save()
        trainer.export_hf()
    if rank == 0:
        print(f'run directory: {config.local_run_dir}', flush=True)
    if dist.is_initialized():
        dist.destroy_process_group()


@hydra.main(version_base=None, config_path='config', config_name='config')
def main(config: DictConfig):
    trainer_class = TRAINERS.get(config.trainer)  # check_config names an unknown trainer
    distributed = trainer_class is not None and trainer_class.distributed
    under_torchrun = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    world_size = (int(os.environ['WORLD_SIZE']) if under_torchrun
                  else max(1, torch.cuda.device_count()) if distributed else 1)
    try:
        check_config(config, world_size)
        resume_from = resume_checkpoint(config)
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    if distributed and not under_torchrun:
        # as the reference: one process per local GPU (one on a CPU-only machine), rendezvous on this host
        os.environ.setdefault('MASTER_ADDR', 'localhost')
        os.environ['MASTER_PORT'] = str(config.fsdp_port or utils.get_open_port())
        print(f'{config.trainer}: starting one process per local GPU ({world_size})', flush=True)
        mp.spawn(worker_main, nprocs=world_size, args=(world_size, config, resume_from), join=True)
    else:
        worker_main(int(os.environ.get('RANK', 0)), world_size, config, resume_from)


if __name__ == '__main__':
    main()
