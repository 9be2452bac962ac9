"""The device and the process group: which device a process computes on (`default_device`), joining the process
group with its two gloo groups for slow phases and for naming a silent rank, the gathers the
trainers use, and the one line a collective ends a run with when another rank stops answering.

It exists apart from utils.py so that everything that holds process-wide torch.distributed state (the groups made by
`init_distributed`) is in one module, which checkpoints.py, run_dirs.py, the trainers and train.py share. Imports
no module of the project but disk.py.
"""
import datetime
import os
import socket
from typing import List, Optional

import torch
import torch.distributed as dist

import utils
from disk import exception_chain


def default_device() -> str:
    """'cuda' where a GPU is visible, else 'cpu': where models, meshes and the process group's backend go."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def all_gather_if_needed(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate a (B,) tensor from every rank along dim 0 (identity in a single process)."""
    if world_size == 1:
        return values
    gathered = [torch.empty_like(values) for _ in range(world_size)]
    dist.all_gather(gathered, values)
    return torch.cat(gathered)


def all_gather_objects(objects: List, world_size: int) -> List:
    """Concatenate a list of picklable objects from every rank, in rank order (identity in a single process)."""
    if world_size == 1:
        return objects
    gathered = [None] * world_size
    dist.all_gather_object(gathered, objects)
    return [o for rank_objects in gathered for o in rank_objects]


_SLOW_GROUP = _PROBE_GROUP = None  # gloo groups: phases where ranks wait on one rank; naming a silent rank


def init_distributed(rank: int, world_size: int, collective_timeout_s: float = 600, slow_phase_timeout_s: float = 7200):
    """Join the process group: nccl with one GPU per process (LOCAL_RANK under torchrun), gloo on CPU.
    The rendezvous address is MASTER_ADDR/MASTER_PORT from the environment (torchrun's, or train.py's).
    A collective that waits longer than collective_timeout_s fails (NCCL: its watchdog ends the process,
    TORCH_NCCL_ASYNC_ERROR_HANDLING=3 unless set); `slow_group()` bounds the phases where ranks wait on one
    rank (rank 0 choosing the checkpoint, ranks loading data and models, checkpoint writes) by slow_phase_timeout_s."""
    global _SLOW_GROUP, _PROBE_GROUP
    if default_device() == 'cuda':
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', rank)))
        os.environ.setdefault('TORCH_NCCL_ASYNC_ERROR_HANDLING', '3')
    dist.init_process_group('nccl' if default_device() == 'cuda' else 'gloo', rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=collective_timeout_s))
    _SLOW_GROUP = dist.new_group(backend='gloo', timeout=datetime.timedelta(seconds=slow_phase_timeout_s))
    _PROBE_GROUP = dist.new_group(backend='gloo', timeout=datetime.timedelta(seconds=min(60, collective_timeout_s)))


def slow_group():
    """The process group for collectives where ranks legitimately wait on one rank (None: not distributed)."""
    return _SLOW_GROUP if dist.is_initialized() else None


def wait_for_all_ranks():
    """A barrier under slow_phase_timeout_s: after the phases where one rank may work while others wait."""
    if dist.is_initialized():
        dist.barrier(group=_SLOW_GROUP)


# what gloo and NCCL raise when a peer stops answering (a timeout) or is gone (its connection closed)
COLLECTIVE_FAILURES = ('Timed out waiting', 'timed out', 'failed to pass monitoredBarrier', 'Connection closed by peer',
                       'Connection reset by peer', 'Watchdog caught collective operation timeout')


def collective_failure(error: BaseException) -> Optional[BaseException]:
    """The exception in `error`'s chain that a collective raised because a peer rank stopped answering, or None."""
    return next((e for e in exception_chain(error) if isinstance(e, RuntimeError) and dist.is_initialized()
                 and any(marker in str(e) for marker in COLLECTIVE_FAILURES)), None)


def _collective_site(error: BaseException) -> str:
    """'all_reduce (trainers.py:343 any_rank)': the torch.distributed call and our code that made it."""
    import traceback
    frames = traceback.extract_tb(error.__traceback__)
    ours = [f for f in frames if os.path.dirname(os.path.abspath(f.filename)) == os.path.dirname(os.path.abspath(__file__))]
    c10d = [f for f in frames if f.filename.endswith('distributed_c10d.py')]
    torch_frames = [f for f in frames if f'{os.sep}torch{os.sep}' in f.filename]
    name = c10d[-1].name if c10d else torch_frames[-1].name if torch_frames else 'a collective'
    return name + (f' ({os.path.basename(ours[-1].filename)}:{ours[-1].lineno} {ours[-1].name})' if ours else '')


def collective_failure_line(error: BaseException, rank: int, timeout_s: float, slow_timeout_s: float) -> Optional[str]:
    """One line for a collective that failed because another rank stopped answering (None for other errors):
    which collective, the backend's words, and the silent rank where a monitored barrier on the other ranks
    names it (rank 0 learns it; a bounded wait of at most 60 s)."""
    failure = collective_failure(error)
    if failure is None:
        return None
    silent = ''
    try:
        dist.monitored_barrier(group=_PROBE_GROUP, timeout=datetime.timedelta(seconds=min(60, timeout_s)),
                               wait_all_ranks=True)
    except RuntimeError as e:
        silent = f'; {str(e).strip().splitlines()[0]}'
    backend = utils.first_line(failure)
    return (f'rank {rank}: collective {_collective_site(failure)} failed: another rank stopped answering ({backend}'
            f'{silent}; collective_timeout_s={timeout_s:g}, slow_phase_timeout_s={slow_timeout_s:g}). The checkpoints '
            f'written so far are intact: rerun with resume=true to continue from the last complete one')


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('', 0))
        return s.getsockname()[1]
