"""The tokenized-data cache (tokenized_cache.py): safetensors, never a pickle: loading it runs no
code, and a planted malicious pickle at a cache path (old or new naming) creates nothing; damaged entries
are rebuilt with one line; N processes arriving at once at a fresh cache build it once and all read the same
examples; a cache that cannot be written does not stop the run."""
import glob
import json
import os
import pickle
import subprocess
import sys
import time

import pytest
import torch

import model_loading
import preference_datasets as pd
import tokenized_cache
from helpers import CACHE, HH_SAMPLE, ROOT, compose_config, write_hh_file


@pytest.fixture(scope='module')
def tokenizer():
    return model_loading.load_tokenizer(compose_config(['model=tiny', 'exp_name=t']).model, CACHE)


def chat_file(path):
    rows = [{'prompt': [{'role': 'user', 'content': f'Review film {i} <|im_end|>'}], 'chosen': f'Great {i}.',
             'rejected': 'Bad.'} for i in range(6)]
    with open(path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    return str(path)


def load(paths, tokenizer, cache, sft=False, **kwargs):
    return pd.load_examples(paths, tokenizer, 'train', 64, 32, sft_mode=sft, cache_dir=str(cache), eval_fraction=0.0,
                            silent=True, **kwargs)


class Planted:
    """Unpickling this creates a file: the 'code' a planted checkpoint or cache would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def test_cache_is_safetensors_and_loads_without_pickle(tokenizer, tmp_path, monkeypatch):
    paths = [write_hh_file(tmp_path / 'hh.jsonl', n=6), chat_file(tmp_path / 'chat.jsonl')]
    for sft in (False, True):
        first = load(paths, tokenizer, tmp_path / 'cache', sft=sft)
        assert len(first) == (12 if not sft else 12)
        files = sorted(os.listdir(tmp_path / 'cache' / 'tokenized'))
        entries = [f for f in files if f.endswith('.safetensors')]
        assert entries and all(f.endswith('.safetensors') for f in files), files
        for entry in entries:  # a safetensors file: 8-byte header length, then a JSON header
            with open(tmp_path / 'cache' / 'tokenized' / entry, 'rb') as f:
                n = int.from_bytes(f.read(8), 'little')
                assert json.loads(f.read(n))['__metadata__']['format'] == tokenized_cache.FORMAT

        def no_code(*args, **kwargs):
            raise AssertionError('the cache was loaded with pickle')
        with monkeypatch.context() as m:
            for target, name in ((pickle, 'load'), (pickle, 'loads'), (torch, 'load')):
                m.setattr(target, name, no_code)
            m.setattr(pd, 'get_dataset', no_code)   # and from the cache, not rebuilt
            assert load(paths, tokenizer, tmp_path / 'cache', sft=sft) == first


def test_planted_pickle_at_a_cache_path_creates_nothing(tokenizer, tmp_path, capsys):
    path = write_hh_file(tmp_path / 'hh.jsonl', n=6)
    expected = load([path], tokenizer, tmp_path / 'clean')
    [entry] = glob.glob(str(tmp_path / 'clean' / 'tokenized' / '*.safetensors'))
    key = os.path.basename(entry)[:-len('.safetensors')]
    directory = tmp_path / 'cache' / 'tokenized'
    directory.mkdir(parents=True)
    markers = []
    # the new naming, the old naming (<key>.pt, as the pickle cache wrote it), and an old entry's name
    for name in (f'{key}.safetensors', f'{key}.pt', '0123456789abcdef.pt'):
        markers.append(str(tmp_path / f'pwned-{name}'))
        with open(directory / name, 'wb') as f:
            pickle.dump(Planted(markers[-1]), f)
    capsys.readouterr()
    assert load([path], tokenizer, tmp_path / 'cache') == expected
    assert not any(os.path.exists(m) for m in markers)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f'warning: ignoring {directory}/{key}.safetensors: not a valid '
                                               f'tokenized-data cache') and out[0].endswith('tokenizing again'), out
    assert load([path], tokenizer, tmp_path / 'cache') == expected   # rebuilt: now a valid entry
    assert capsys.readouterr().out == ''


def test_damaged_entries_are_rebuilt(tokenizer, tmp_path, capsys):
    path = write_hh_file(tmp_path / 'hh.jsonl', n=6)
    expected = load([path], tokenizer, tmp_path / 'cache')
    [entry] = glob.glob(str(tmp_path / 'cache' / 'tokenized' / '*.safetensors'))
    original = open(entry, 'rb').read()
    tensors, metadata = {}, None
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(entry, 'pt') as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    damaged = {
        'truncated': lambda: open(entry, 'wb').write(original[:len(original) // 2]),
        'empty': lambda: open(entry, 'wb').close(),
        'ids outside the vocabulary': lambda: save_file({**tensors, 'chosen_ids': tensors['chosen_ids'] + 10 ** 6}, entry, metadata),
        'inconsistent offsets': lambda: save_file({**tensors, 'prompt_ids_offsets': tensors['prompt_ids_offsets'].flip(0)}, entry, metadata),
        'another format': lambda: save_file(tensors, entry, {**metadata, 'format': 'x'}),
    }
    for name, damage in damaged.items():
        damage()
        capsys.readouterr()
        assert load([path], tokenizer, tmp_path / 'cache') == expected, name
        out = capsys.readouterr().out
        assert out.count('\n') == 1 and 'not a valid tokenized-data cache' in out, (name, out)


def test_unwritable_cache_does_not_stop_the_run(tokenizer, tmp_path, monkeypatch, capsys):
    path = write_hh_file(tmp_path / 'hh.jsonl', n=6)

    def full_disk(tensors, filename, metadata=None):
        with open(filename, 'wb') as f:
            f.write(b'partial')
        raise OSError(28, 'No space left on device')
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, 'save_file', full_disk)
    examples = load([path], tokenizer, tmp_path / 'cache')
    assert len(examples) == 6
    out = capsys.readouterr().out
    assert 'warning: could not write the tokenized-data cache' in out and 'No space left on device' in out
    assert os.listdir(tmp_path / 'cache' / 'tokenized') == []  # no partial file


WORKER = r'''
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import preference_datasets as pd, model_loading
from helpers import compose_config
tokenizer = model_loading.load_tokenizer(compose_config(['model=tiny', 'exp_name=t']).model, sys.argv[2])
real = pd.get_dataset
def counting(*args, **kwargs):
    with open(sys.argv[5], 'a') as f:
        f.write(f'{os.getpid()}\n')
    return real(*args, **kwargs)
pd.get_dataset = counting
while not os.path.exists(sys.argv[6]):   # all processes start loading at the same moment
    time.sleep(0.005)
examples = pd.load_examples([sys.argv[3]], tokenizer, 'train', 128, 64, sft_mode=False, cache_dir=sys.argv[4],
                            eval_fraction=0.1, silent=True)
print(json.dumps([[e.prompt_ids, e.chosen_ids, e.rejected_ids] for e in examples]))
'''


def test_processes_arriving_at_once_build_the_cache_once(tokenizer, tmp_path):
    """Real concurrent processes (as torchrun ranks or two jobs on a node) on a fresh cache directory."""
    data = HH_SAMPLE if os.path.exists(HH_SAMPLE) else write_hh_file(tmp_path / 'hh.jsonl', n=600)
    cache, builds, go = tmp_path / 'cache', tmp_path / 'builds', tmp_path / 'go'
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    procs = [subprocess.Popen([sys.executable, '-c', WORKER, ROOT, CACHE, data, str(cache), str(builds), str(go)],
                              cwd=os.path.join(ROOT, 'tests'), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    time.sleep(8)   # let every process import and load its tokenizer, then release them together
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    results = [out.strip().splitlines()[-1] for out, _ in outs]
    assert len(set(results)) == 1 and len(json.loads(results[0])) > 100
    assert len(open(builds).read().split()) == 1          # one process tokenized; the others read its cache
    files = os.listdir(cache / 'tokenized')
    assert len(files) == 1 and files[0].endswith('.safetensors'), files   # no temporary or lock file left
    expected = pd.load_examples([data], tokenizer, 'train', 128, 64, sft_mode=False, cache_dir=str(tmp_path / 'fresh'),
                                eval_fraction=0.1, silent=True)
    assert json.loads(results[0]) == [[e.prompt_ids, e.chosen_ids, e.rejected_ids] for e in expected]
