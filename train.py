"""Entry point: `python -u train.py model=... datasets=[...] loss=sft|tdpo|dpo|ipo exp_name=...`.

Composes config/ with Hydra, checks it, writes the resolved config into a new run directory, builds
policy and reference models, and hands them to the trainer class named by `trainer`. A distributed
trainer runs one process per local GPU (spawned here), or one per process that torchrun starts.
The config's checks are in run_config.py, the run directory's choice and lock in run_dirs.py, the models'
loading in models.py.
"""
import errno
import os
import signal
import subprocess
import sys
from typing import Optional

import hydra
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig

import batches
import checkpoints
import distributed
import memory
import models
import preference_datasets
import run_config
import run_logging
import sharded_trainers
import stop_signals
import trainers
import utils
from run_config import ConfigError, compose_config, missing_keys  # noqa: F401 (also train.X, as before)
from run_dirs import choose_checkpoint, open_run_dir, remove_if_unused, resume_run_dir  # noqa: F401 (likewise)

TRAINERS = sharded_trainers.TRAINERS  # trainer=NAME
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGUSR1 after a checkpoint; resume=true continues


def check_config(config: DictConfig, world_size: int = 1):
    """run_config.check_config with this script's trainers (`TRAINERS`)."""
    run_config.check_config(config, world_size, TRAINERS)


def build_models(config: DictConfig, device_map=None):
    """models.build_models for the trainer that `trainer` names."""
    return models.build_models(config, TRAINERS[config.trainer], device_map=device_map)


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


def worker_main(rank: int, world_size: int, config: DictConfig):
    """One process of the run (the only one for BasicTrainer): builds its models, trains (or continues
    the checkpoint that `open_run_dir` chose), saves."""
    stop_signals.catch_stop_signals()  # from here on, a preemption signal stops the run with exit 75
    trainer_class = TRAINERS[config.trainer]
    if trainer_class.distributed:
        distributed.init_distributed(rank, world_size, config.collective_timeout_s, config.slow_phase_timeout_s)
    resume_from, lock, created = open_run_dir(config, rank)
    finished = False
    try:
        run_training(rank, world_size, config, resume_from)
        finished = True
    except checkpoints.CheckpointError as e:  # a full disk (DiskFullError), a damaged or unsafe checkpoint
        sys.exit(str(e) if rank == 0 else 1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sys.exit(f'disk full: {e}; the checkpoints written so far are intact' if rank == 0 else 1)
    except Exception as e:  # a rank that stops answering: one line from each rank that waited for it
        line = distributed.collective_failure_line(e, rank, config.collective_timeout_s, config.slow_phase_timeout_s)
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
    if resume_from and checkpoints.finished_run_kept(resume_from) != 'all':
        return finished_run_without_optimizer(config, resume_from, len(data.train), rank)
    try:
        policy, reference_model = models.build_models(config, trainer_class, device_map=device_map)
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    run_id = checkpoints.load_training_state(resume_from, config.trust_checkpoint_code)['wandb_id'] \
        if resume_from and rank == 0 else None
    if rank == 0:
        run_logging.init_wandb(config, run_id)
    distributed.wait_for_all_ranks()  # ranks that loaded fast wait for one that tokenized or converted (slow_phase_timeout_s)
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
    except memory.CheckpointingUnsupported as e:
        sys.exit(f'config error: {e}')
    except trainers.Preempted as e:
        print(e, flush=True)
        # the checkpoint is written: a further SIGTERM (torchrun stopping the other processes once one has exited,
        # Slurm ending a requeued job) must not kill this process while it exits, after Python's handlers are gone
        for signum in stop_signals.STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        if rank == 0:
            requeue_slurm_job()
        sys.exit(PREEMPTED_EXIT_CODE)
    except Exception as e:  # out of memory (after Preempted, a RuntimeError too): one line from each rank that ran out
        if not memory.is_out_of_memory(e):
            raise
        data_parallel = world_size if trainer_class.splits_batches else 1
        sys.exit(memory.out_of_memory_advice(config, e, rank, world_size, data_parallel,
                                             checkpoints.latest_checkpoint(config.local_run_dir)))
    finally:
        if rank == 0:
            run_logging.finish_wandb()
    if not config.debug:
        trainer.save()
        trainer.export_hf()
        if rank == 0:
            checkpoints.finish_run(config.local_run_dir, config.finished_run_keeps)
    if rank == 0:
        print(f'run directory: {config.local_run_dir}', flush=True)


def finished_run_without_optimizer(config: DictConfig, checkpoint: str, n_available: int, rank: int):
    """A resumed checkpoint of a run that finished keeping less than all (finished_run_keeps): nothing to do if
    the run is complete with its hf/ export; else stop with one line (there is no optimizer state to go on)."""
    kept = checkpoints.finished_run_kept(checkpoint)
    seen = checkpoints.checkpoint_step(checkpoint, config.trust_checkpoint_code)
    total = batches.n_train_examples(n_available, config)
    exported = os.path.exists(os.path.join(config.local_run_dir, 'hf', 'config.json'))
    if seen >= total and exported:
        utils.rank0_print(f'{config.local_run_dir} finished after {seen} examples (finished_run_keeps={kept}): '
                          f'nothing to do')
        return
    what = f'train {total - seen} more examples' if seen < total else 'export it again (hf/ is missing)'
    sys.exit(f'cannot {what} from {checkpoint}: its run finished with finished_run_keeps={kept}, which kept no '
             f'optimizer state; start a new run from its weights (model.archive=<a step-N>/policy.pt, or '
             f'model.name_or_path={config.local_run_dir}/hf) with a new exp_name or local_run_dir'
             if rank == 0 else 1)


@hydra.main(version_base=None, config_path='config', config_name='config')
def main(config: DictConfig):
    trainer_class = TRAINERS.get(config.trainer)  # check_config names an unknown trainer
    distributed_trainer = trainer_class is not None and trainer_class.distributed
    under_torchrun = 'RANK' in os.environ and 'WORLD_SIZE' in os.environ
    world_size = (int(os.environ['WORLD_SIZE']) if under_torchrun
                  else max(1, torch.cuda.device_count()) if distributed_trainer else 1)
    try:
        check_config(config, world_size)
        if config.model.archive is not None and not config.trust_checkpoint_code:
            checkpoints.load_archive(config.model.archive, mmap=True)  # refused before anything is written
        resume_run_dir(config)
    except ConfigError as e:
        sys.exit(f'config error: {e}')
    except checkpoints.CheckpointError as e:
        sys.exit(str(e))
    if distributed_trainer and not under_torchrun:
        # as the reference: one process per local GPU (one on a CPU-only machine), rendezvous on this host
        os.environ.setdefault('MASTER_ADDR', 'localhost')
        os.environ['MASTER_PORT'] = str(config.fsdp_port or distributed.get_open_port())
        print(f'{config.trainer}: starting one process per local GPU ({world_size})', flush=True)
        mp.spawn(worker_main, nprocs=world_size, args=(world_size, config), join=True)
    else:
        worker_main(int(os.environ.get('RANK', 0)), world_size, config)


if __name__ == '__main__':
    main()
