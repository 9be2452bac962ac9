"""Small generic helpers, importing no module of the project: private run and cache directories (`get_local_dir`,
`get_local_run_dir`, `make_private_dir`), `rank0_print`, `formatted_dict`, seeding and RNG state (`seed_everything`,
`rng_state`, `set_rng_state`), padding (`pad_to_length`), slicing and moving batches (`slice_batch`, `move_batch`), an
exception's first line (`first_line`) and `fsync_path`. Nothing else belongs here: the process
group is distributed.py's, stop signals stop_signals.py's, model and tokenizer loading model_loading.py's, full-disk
detection disk.py's, wandb run_logging.py's."""
import datetime
import getpass
import os
import pwd
import random
import stat
import tempfile
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist


def private_dir_problem(path: str) -> Optional[str]:
    """Why `path` is not a directory of this user's own (None if it is): a symbolic link or a directory
    that another user made (in a shared scratch directory such as /scr, anyone can create names). A
    symbolic link of this user's own to a directory of this user's own is fine."""
    try:
        link, target = os.lstat(path), os.stat(path)
    except OSError as e:
        return f'cannot be used ({e.strerror})'
    if stat.S_ISLNK(link.st_mode) and link.st_uid != os.getuid():
        return f'is a symbolic link (to {os.readlink(path)}) made by {_user_name(link.st_uid)}'
    if not stat.S_ISDIR(target.st_mode):
        return 'is not a directory'
    if target.st_uid != os.getuid():
        return f'belongs to {_user_name(target.st_uid)}, not to you ({_user_name(os.getuid())})'
    return None


def _user_name(uid: int) -> str:
    try:
        return f'{pwd.getpwuid(uid).pw_name} (uid {uid})'
    except KeyError:
        return f'uid {uid}'


def make_private_dir(path: str) -> Optional[str]:
    """Create `path` (with the user's umask) unless it exists; None if it is then this user's own, else why not."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f'cannot be created ({e.strerror})'
    return private_dir_problem(path)


_WARNED, _FALLBACK = set(), {}


def get_local_dir(prefixes: List[str]) -> str:
    """This user's directory `<prefix>/<user>` for run directories and caches, under the first of
    `local_dirs` that exists (the reference's scratch-disk order; the last is created if none does).
    It must be this user's own (see private_dir_problem): otherwise a warning and the next existing
    entry, then the last (created), then ~/.cache/tdpo, then a new private temporary directory."""
    user = getpass.getuser()
    prefixes = [p for p in prefixes if os.path.isdir(p)] + [prefixes[-1]]
    for path in list(dict.fromkeys(os.path.join(p, user) for p in prefixes)) + [os.path.expanduser('~/.cache/tdpo')]:
        problem = make_private_dir(path)
        if problem is None:
            return path
        if (path, problem) not in _WARNED:  # once per process
            _WARNED.add((path, problem))
            print(f'warning: not using {path}: it {problem}; trying the next candidate', flush=True)
    key = tuple(prefixes)
    if key not in _FALLBACK:
        _FALLBACK[key] = tempfile.mkdtemp(prefix=f'tdpo-{user}-')
        print(f'warning: no directory of yours in local_dirs; using {_FALLBACK[key]}', flush=True)
    return _FALLBACK[key]


def get_local_run_dir(exp_name: str, local_dirs: List[str]) -> str:
    """A new run directory's path `<local dir>/<user>/<exp_name>_<timestamp>` (the reference's layout);
    train.py creates it once the config is resolved."""
    now = datetime.datetime.now().strftime('%Y-%m-%d_%H-%M-%S_%f')
    return os.path.join(get_local_dir(local_dirs), f'{exp_name}_{now}')


def rank0_print(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs, flush=True)


def formatted_dict(d: Dict) -> Dict:
    return {k: (f'{v:.5g}' if isinstance(v, float) else v) for k, v in d.items()}


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pad_to_length(tensor: torch.Tensor, length: int, pad_value, dim: int = -1) -> torch.Tensor:
    if tensor.size(dim) >= length:
        return tensor
    pad_size = list(tensor.shape)
    pad_size[dim] = length - tensor.size(dim)
    return torch.cat([tensor, torch.full(pad_size, pad_value, dtype=tensor.dtype, device=tensor.device)], dim=dim)


def slice_batch(batch: Dict, index: int, parts: int) -> Dict:
    """The index-th of `parts` equal slices of every list and tensor in a batch."""
    size = len(batch['prompt'])
    assert size % parts == 0, f'batch of {size} cannot be split into {parts} equal parts'
    step = size // parts
    return {k: v[index * step:(index + 1) * step] for k, v in batch.items()}


def move_batch(batch: Dict, device) -> Dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), at most 200 characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def fsync_path(path: str):
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# RNG state, stored as tensors, lists and numbers (they load with weights_only=True)

def rng_state() -> Dict:
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {'python': random.getstate(), 'numpy': [name, keys.tolist(), position, has_gauss, cached_gaussian],
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict):
    random.setstate(state['python'])
    name, keys, position, has_gauss, cached_gaussian = state['numpy']
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
