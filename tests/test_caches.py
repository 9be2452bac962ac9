"""No cache is trusted because it exists: entries are sealed with checkpoints.write_manifest (sizes and hashes,
written last) and verified with checkpoints.manifest_problem when read; a truncated or corrupted file of the
model cache (the dequantized GGUF model), of the demo's generated pairs or of an evaluation result is named
in one line and the entry rebuilt."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import checkpoints
import utils
from helpers import CACHE, ROOT, compose_config


def truncate(path):
    size = os.path.getsize(path)
    with open(path, 'r+b') as f:
        f.truncate(size // 2)
    return size


def corrupt_tail(path, n=16):
    """Flip the last n bytes (in the last block the sampled hash reads), keeping the size."""
    with open(path, 'r+b') as f:
        f.seek(-n, os.SEEK_END)
        data = f.read(n)
        f.seek(-n, os.SEEK_END)
        f.write(bytes(b ^ 0xFF for b in data))


def test_manifest_names_a_truncated_a_corrupted_and_a_missing_file(tmp_path):
    small, large = tmp_path / 'small.jsonl', tmp_path / 'large.bin'
    small.write_text('{"a": 1}\n' * 100)
    with open(large, 'wb') as f:  # above HASHED_WHOLE: hashed at sampled blocks
        f.write(os.urandom(checkpoints.HASHED_WHOLE + 5 * 2**20))
    manifest = str(tmp_path / 'entry.manifest.json')
    checkpoints.write_manifest(manifest, [str(small), str(large)])
    assert checkpoints.manifest_problem(manifest) is None
    assert checkpoints.file_fingerprint(str(large))['sampled_sha256']
    corrupt_tail(str(small))
    assert checkpoints.manifest_problem(manifest) == 'small.jsonl has the size its manifest says but other contents ' \
                                                     '(its sha256 differs)'
    small.write_text('{"a": 1}\n' * 100)
    assert checkpoints.manifest_problem(manifest) is None
    size = truncate(str(large))
    assert checkpoints.manifest_problem(manifest) == f'large.bin is {size // 2} bytes, its manifest says {size}'
    os.remove(large)
    assert checkpoints.manifest_problem(manifest) == 'large.bin is missing'
    os.remove(manifest)
    assert checkpoints.manifest_problem(manifest).startswith('no entry.manifest.json')


def test_model_cache_rebuilds_a_truncated_or_corrupted_entry(tmp_path, capsys):
    model_config = compose_config(['model=tiny', 'exp_name=x']).model
    entry = utils.resolve_model_source(model_config, utils.get_local_dir([CACHE]))  # converted once, shared
    cache = str(tmp_path / 'cache')
    copy = os.path.join(cache, 'models', os.path.basename(entry))
    shutil.copytree(entry, copy)
    assert utils.resolve_model_source(model_config, cache) == copy
    assert 'damaged' not in capsys.readouterr().out
    weights = os.path.join(copy, 'model.safetensors')
    size = truncate(weights)
    assert utils.resolve_model_source(model_config, cache) == copy
    out = capsys.readouterr().out
    assert f'model cache {copy} is damaged (model.safetensors is {size // 2} bytes, its manifest says {size}); ' \
           f'converting' in out, out
    assert os.path.getsize(weights) == size and checkpoints.manifest_problem(os.path.join(copy, 'manifest.json')) is None
    corrupt_tail(weights)
    utils.resolve_model_source(model_config, cache)
    out = capsys.readouterr().out
    assert 'model.safetensors has the size its manifest says but other contents' in out, out
    from safetensors.torch import load_file
    rebuilt, original = load_file(weights), load_file(os.path.join(entry, 'model.safetensors'))
    assert rebuilt.keys() == original.keys() and all((rebuilt[k] == original[k]).all() for k in original)
    assert not [n for n in os.listdir(os.path.dirname(copy)) if '.tmp' in n], 'leftovers of the rebuild'
