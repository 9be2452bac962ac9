"""Run directories and their locks: which run directory a run writes to (a new one, or the one it continues),
which of its checkpoints it continues from, locking it for the life of the run and writing its config.yaml there,
and removing one that a failed launch created and left without anything of a run."""
import fcntl
import os
import re
import shutil
import socket
import sys
import time
from typing import List, Optional, Tuple

import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import checkpoints
import distributed
import run_identity
import utils
from run_config import ConfigError

LOCK_FILE = '.lock'  # in the run directory; says which host and pid hold the run


class RunDirBusy(checkpoints.CheckpointError):
    """Another live process holds the run directory's lock."""


class RunDirLock:
    """An exclusive flock on `<run_dir>/.lock`, held until `release` or the process ends (a dead process
    holds no lock). The file says which host and pid hold it."""

    def __init__(self, run_dir: str):
        self.fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            for _ in range(20):  # the holder writes who it is right after it locks
                holder = os.pread(self.fd, 200, 0).decode(errors='replace').strip()
                if holder:
                    break
                time.sleep(0.05)
            self.release()
            raise RunDirBusy(f'run directory {run_dir} is in use by {holder or "another process"}: another launch of this run is '
                             f'writing to it; wait for it to end or stop it') from None
        except OSError as e:  # a file system without locks
            self.release()
            print(f'warning: cannot lock run directory {run_dir} ({e.strerror}); nothing stops a second '
                  f'launch of this run from writing into it', flush=True)
            return
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f'host {socket.gethostname()} pid {os.getpid()}\n'.encode(), 0)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor releases the lock
            self.fd = None


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
        run_dir = newest_run_dir(config.exp_name, config.local_dirs)
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
    run_identity.check_resume(config, checkpoint)  # the same run, or changes the user allowed
    return checkpoint


def open_run_dir(config: DictConfig, rank: int) -> Tuple[Optional[str], Optional[RunDirLock], bool]:
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
            lock = RunDirLock(config.local_run_dir)
            resume_from = choose_checkpoint(config)
            if resume_from is None:
                run_identity.record(config)  # what defines this run, for later resumes to compare with
        except ConfigError as e:
            error = f'config error: {e}'
        except (checkpoints.CheckpointError, run_identity.RunMismatch) as e:
            error = str(e)
    if dist.is_initialized():
        shared = [config.local_run_dir, resume_from, error]
        dist.broadcast_object_list(shared, src=0, group=distributed.slow_group())  # rank 0 verified checkpoints meanwhile
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
    if os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= {'config.yaml', run_identity.RECORD, LOCK_FILE,
                                                                'wandb'}:
        shutil.rmtree(run_dir, ignore_errors=True)


def newest_run_dir(exp_name: str, local_dirs: List[str]) -> Optional[str]:
    """The newest `<exp_name>_<timestamp>` run directory that holds a checkpoint that verifies."""
    parent = utils.get_local_dir(local_dirs)
    pattern = re.escape(exp_name) + r'_\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d+'
    runs = sorted(d for d in (os.listdir(parent) if os.path.isdir(parent) else []) if re.fullmatch(pattern, d))
    return next((os.path.join(parent, d) for d in reversed(runs) if checkpoints.latest_checkpoint(os.path.join(parent, d))), None)
