"""Entry point: `python -u train.py model=... datasets=[...] loss=sft|tdpo|dpo|ipo exp_name=...`.

Composes config/ with Hydra, checks it, writes the resolved config into a new run directory, builds
policy and reference models, and hands them to the trainer class named by `trainer`. A distributed
trainer runs one process per local GPU (spawned here), or one per process that torchrun starts.
"""
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from typing import Optional, Tuple

import hydra
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

import checkpoints
import lora
import pair_layout
import preference_datasets
import run_identity
import sharded_trainers
import token_stats
import trainers
import utils

OmegaConf.register_new_resolver('get_local_run_dir', utils.get_local_run_dir, replace=True)
OmegaConf.register_new_resolver('pkg_dir', utils.package_dir, replace=True)


def compose_config(overrides) -> DictConfig:
    """The config that `python train.py <overrides>` runs with (Hydra's compose API on the same config/),
    for tools that need it without running (`python preference_datasets.py`)."""
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'config'),
                               version_base=None):
        return compose('config', overrides=list(overrides))

TRAINERS = sharded_trainers.TRAINERS  # trainer=NAME
DTYPES = ('float32', 'bfloat16', 'float16')  # model.policy_dtype, model.reference_dtype, model.fsdp_policy_mp
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
    """Policy, and for preference losses a frozen reference (in `model.reference_dtype`, null: the dtype
    the policy computes in under this trainer); both get `model.archive` weights if set. With LoRA
    (lora.r set) the policy gets adapters and no reference is loaded: the reference is the policy with
    its adapters disabled."""
    cache_dir = utils.get_local_dir(config.local_dirs)
    policy = utils.load_model(config.model, config.model.policy_dtype, cache_dir, device_map=device_map)
    reference_model = None
    if config.loss.name in PREFERENCE_LOSSES and not lora.enabled(config.lora):
        reference_dtype = TRAINERS[config.trainer].reference_dtype(config.model)
        utils.rank0_print(f'reference model in {reference_dtype}')
        reference_model = utils.load_model(config.model, reference_dtype, cache_dir, device_map=device_map)
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
        utils.load_weights(model, state, f'model.archive={config.model.archive}', config.model.name_or_path)
    except utils.WeightsMismatch as e:
        raise ConfigError(str(e)) from None


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


def resume_run_dir(config: DictConfig):
    """Set config.local_run_dir to the run directory to continue (that of resume_from, or with resume=true
    the newest <exp_name>_* run with a checkpoint, unless the user named local_run_dir). Call before the
    config is resolved; the checkpoint itself is chosen once the directory is locked (`open_run_dir`)."""
    if config.resume_from:
        checkpoint = os.path.abspath(config.resume_from)
        if not os.path.exists(os.path.join(checkpoint, checkpoints.TRAINING_STATE)):
            raise ConfigError(f'resume_from={config.resume_from}: not a complete checkpoint directory '
                              f'(no {checkpoints.TRAINING_STATE})')
        config.local_run_dir = os.path.dirname(checkpoint)
    # the default local_run_dir is a new timestamped directory; one the user set (it may interpolate other
    # keys, e.g. runs/beta${loss.beta} in a sweep) names the run directory to continue
    elif config.resume and str(OmegaConf.to_container(config, resolve=False)['local_run_dir']).startswith('${get_local_run_dir:'):
        run_dir = checkpoints.newest_run_dir(config.exp_name, config.local_dirs)
        if run_dir is None:
            utils.rank0_print(f'resume=true: no checkpoint of {config.exp_name} yet; starting a new run')
        else:
            config.local_run_dir = run_dir


def choose_checkpoint(config: DictConfig) -> Optional[str]:
    """The checkpoint to continue from (None: start from the beginning); the run directory is locked."""
    if config.resume_from:
        checkpoint = checkpoints.check_resume_from(os.path.abspath(config.resume_from), config.trust_checkpoint_code)
    elif not config.resume:
        return None
    else:
        checkpoint = checkpoints.resume_point(config.local_run_dir, config.trust_checkpoint_code)
    if checkpoint is None:
        print(f'resume=true: no checkpoint in {config.local_run_dir} yet; starting from the beginning', flush=True)
        return None
    changed = run_identity.check_resume(config, checkpoint)  # the same run, or changes the user allowed
    run_identity.check_optimizer_state(checkpoint, changed)
    return checkpoint


def requeue_slurm_job():
    """Under Slurm, put this job back in the queue; with resume=true it continues where it stopped. Not when
    the sbatch scripts in slurm/ started the run (they set TDPO_BATCH_SCRIPT_REQUEUES=1): they requeue the job
    once every training process has exited, as a requeue makes Slurm kill the job's processes. Not when Slurm
    is ending the job (scancel, the time limit): a requeue would undo a scancel."""
    job_id = os.environ.get('SLURM_JOB_ID')
    if not job_id or os.environ.get('TDPO_BATCH_SCRIPT_REQUEUES') == '1':
        return
    try:
        state = subprocess.run(['squeue', '-h', '-j', job_id, '-o', '%T'], capture_output=True, text=True).stdout.strip()
        if state != 'RUNNING':
            print(f'not requeueing Slurm job {job_id}: Slurm is ending it ({state or "gone"})', flush=True)
            return
        print(f'requeueing Slurm job {job_id}', flush=True)
        subprocess.run(['scontrol', 'requeue', job_id], check=False)
    except OSError as e:  # no Slurm commands here (e.g. in a container)
        print(f'cannot requeue Slurm job {job_id}: {e}', flush=True)


def open_run_dir(config: DictConfig, rank: int) -> Tuple[Optional[str], Optional[checkpoints.RunDirLock], bool]:
    """Resolve the config; every rank takes rank 0's run directory (processes started separately, as by
    torchrun, resolve different timestamps). Rank 0 creates it (a directory of the user's own), locks it
    for the life of the run, chooses the checkpoint to continue and writes config.yaml there.
    Returns (checkpoint to continue or None, the lock on rank 0, whether rank 0 created the directory)."""
    OmegaConf.resolve(config)
    lock = resume_from = error = None
    created = rank == 0 and not os.path.exists(config.local_run_dir)
    if rank == 0:
        try:
            problem = utils.make_private_dir(config.local_run_dir)
            if problem:
                raise ConfigError(f'local_run_dir={config.local_run_dir} {problem}: choose a directory of your own')
            lock = checkpoints.RunDirLock(config.local_run_dir)
            resume_from = choose_checkpoint(config)
            if resume_from is None:
                run_identity.record(config)  # what defines this run, for later resumes to compare with
        except ConfigError as e:
            error = f'config error: {e}'
        except (checkpoints.CheckpointError, run_identity.RunMismatch) as e:
            error = str(e)
    if dist.is_initialized():
        shared = [config.local_run_dir, resume_from, error]
        dist.broadcast_object_list(shared, src=0, group=utils.slow_group())  # rank 0 verified checkpoints meanwhile
        config.local_run_dir, resume_from, error = shared
    if error:
        sys.exit(error if rank == 0 else 1)
    for key in ('eval_every', 'checkpoint_every'):  # whole batches
        if config[key] and config[key] % config.batch_size:
            config[key] -= config[key] % config.batch_size
    if rank == 0:
        print(OmegaConf.to_yaml(config))
        with open(os.path.join(config.local_run_dir, 'config.yaml'), 'w') as f:
            OmegaConf.save(config, f)
        print('=' * 80 + f'\nWriting to {socket.gethostname()}:{config.local_run_dir}\n' + '=' * 80, flush=True)
    return resume_from, lock, created


def remove_if_unused(run_dir: str):
    """Remove a run directory this launch created if the launch failed before it wrote anything of a run
    (only config.yaml, run.json, the lock and wandb's files), so that failed launches leave no empty runs behind."""
    if os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= {'config.yaml', run_identity.RECORD, checkpoints.LOCK_FILE,
                                                                'wandb'}:
        shutil.rmtree(run_dir, ignore_errors=True)


def worker_main(rank: int, world_size: int, config: DictConfig):
    """One process of the run (the only one for BasicTrainer): builds its models, trains (or continues
    the checkpoint that `open_run_dir` chose), saves."""
    utils.catch_stop_signals()  # from here on, a preemption signal stops the run with exit 75
    trainer_class = TRAINERS[config.trainer]
    if trainer_class.distributed:
        utils.init_distributed(rank, world_size, config.collective_timeout_s, config.slow_phase_timeout_s)
    resume_from, lock, created = open_run_dir(config, rank)
    finished = False
    try:
        run_training(rank, world_size, config, resume_from)
        finished = True
    except (checkpoints.CheckpointError, utils.DiskFullError) as e:  # a full disk, a damaged or unsafe checkpoint
        sys.exit(str(e) if rank == 0 else 1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sys.exit(f'disk full: {e}; the checkpoints written so far are intact' if rank == 0 else 1)
    except Exception as e:  # a rank that stops answering: one line from each rank that waited for it
        line = utils.collective_failure_line(e, rank, config.collective_timeout_s, config.slow_phase_timeout_s)
        if line is None:
            raise
        sys.exit(line)
    finally:
        if lock is not None:
            lock.release()
        if created and not finished:
            remove_if_unused(config.local_run_dir)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_training(rank: int, world_size: int, config: DictConfig, resume_from: Optional[str]):
    """Build the models and the trainer, train (continuing `resume_from`), save the final checkpoint and the HF export."""
    trainer_class = TRAINERS[config.trainer]
    # BasicTrainer spreads one model over all local GPUs; a distributed trainer gives each rank one GPU
    device_map = 'balanced' if torch.cuda.device_count() > 1 and not trainer_class.distributed else None
    try:  # the data first: a bad data file costs no model load
        data = preference_datasets.load_run_data(config, utils.get_local_dir(config.local_dirs), silent=rank != 0)
    except preference_datasets.DataError as e:
        sys.exit(f'data error: {e}')
    try:
        policy, reference_model = build_models(config, device_map=device_map)
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    run_id = checkpoints.load_training_state(resume_from, config.trust_checkpoint_code)['wandb_id'] \
        if resume_from and rank == 0 else None
    if rank == 0:
        init_wandb(config, run_id)
    utils.wait_for_all_ranks()  # ranks that loaded fast wait for one that tokenized or converted (slow_phase_timeout_s)
    try:
        trainer = trainer_class(policy, config, config.seed, config.local_run_dir,
                                reference_model=reference_model, rank=rank, world_size=world_size, data=data)
        if resume_from:
            trainer.load_training_state(resume_from)
        elif rank == 0 and os.path.exists(trainer.metrics_path):
            os.remove(trainer.metrics_path)  # a new start in a reused run directory
        trainer.train()
    except preference_datasets.DataError as e:  # e.g. fewer examples than one batch
        sys.exit(f'data error: {e}')
    except trainers.NonFiniteError as e:
        sys.exit(f'training stopped: {e}')
    except trainers.Preempted as e:
        print(e, flush=True)
        # the checkpoint is written: a further SIGTERM (torchrun stopping the other processes once one has exited,
        # Slurm ending a requeued job) must not kill this process while it exits, after Python's handlers are gone
        for signum in utils.STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
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


@hydra.main(version_base=None, config_path='config', config_name='config')
def main(config: DictConfig):
    trainer_class = TRAINERS.get(config.trainer)  # check_config names an unknown trainer
    distributed = trainer_class is not None and trainer_class.distributed
    under_torchrun = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    world_size = (int(os.environ['WORLD_SIZE']) if under_torchrun
                  else max(1, torch.cuda.device_count()) if distributed else 1)
    try:
        check_config(config, world_size)
        if config.model.archive is not None and not config.trust_checkpoint_code:
            checkpoints.load_archive(config.model.archive, mmap=True)  # refused before anything is written
        resume_run_dir(config)
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    except checkpoints.CheckpointError as e:
        sys.exit(str(e))
    if distributed and not under_torchrun:
        # as the reference: one process per local GPU (one on a CPU-only machine), rendezvous on this host
        os.environ.setdefault('MASTER_ADDR', 'localhost')
        os.environ['MASTER_PORT'] = str(config.fsdp_port or utils.get_open_port())
        print(f'{config.trainer}: starting one process per local GPU ({world_size})', flush=True)
        mp.spawn(worker_main, nprocs=world_size, args=(world_size, config), join=True)
    else:
        worker_main(int(os.environ.get('RANK', 0)), world_size, config)


if __name__ == '__main__':
    main()
