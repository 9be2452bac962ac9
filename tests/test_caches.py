"""No cache is trusted because it exists: entries are sealed with manifests.write_manifest (sizes and hashes,
written last) and verified with manifests.manifest_problem when read; a truncated or corrupted file of the
model cache (the dequantized GGUF model), of the demo's generated pairs or of an evaluation result is named
in one line and the entry rebuilt."""
import json
import os
import shutil
import subprocess
import sys

import manifests
import model_loading
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
        f.write(os.urandom(manifests.HASHED_WHOLE + 5 * 2**20))
    manifest = str(tmp_path / 'entry.manifest.json')
    manifests.write_manifest(manifest, [str(small), str(large)])
    assert manifests.manifest_problem(manifest) is None
    assert manifests.file_fingerprint(str(large))['sampled_sha256']
    corrupt_tail(str(small))
    assert manifests.manifest_problem(manifest) == 'small.jsonl has the size its manifest says but other contents ' \
                                                     '(its sha256 differs)'
    small.write_text('{"a": 1}\n' * 100)
    assert manifests.manifest_problem(manifest) is None
    size = truncate(str(large))
    assert manifests.manifest_problem(manifest) == f'large.bin is {size // 2} bytes, its manifest says {size}'
    os.remove(large)
    assert manifests.manifest_problem(manifest) == 'large.bin is missing'
    os.remove(manifest)
    assert manifests.manifest_problem(manifest).startswith('no entry.manifest.json')


def test_extra_entries_are_kept_and_a_manifest_without_a_file_list_is_an_older_version(tmp_path):
    """write_manifest's `extra` (the HH scores record the weights they came from) sits beside 'files'; a manifest
    of the format hh_score.py wrote before (size and sha256 at the top, no file list) is named as older."""
    data = tmp_path / 'dpo.jsonl'
    data.write_text('{"a": 1}\n')
    manifest = str(tmp_path / 'dpo.jsonl.manifest.json')
    manifests.write_manifest(manifest, [str(data)], extra={'source': {'model': [1, 2]}, 'records': 1})
    with open(manifest) as f:
        written = json.load(f)
    assert written['source'] == {'model': [1, 2]} and written['records'] == 1 and list(written['files']) == ['dpo.jsonl']
    assert manifests.manifest_problem(manifest) is None
    with open(manifest, 'w') as f:
        json.dump({'bytes': 9, 'sha256': 'ab', 'records': 1, 'source': {}}, f)
    assert manifests.manifest_problem(manifest) == 'dpo.jsonl.manifest.json lists no files (written by an older version)'


def test_model_cache_rebuilds_a_truncated_or_corrupted_entry(tmp_path, capsys):
    model_config = compose_config(['model=tiny', 'exp_name=x']).model
    entry = model_loading.resolve_model_source(model_config, utils.get_local_dir([CACHE]))  # converted once, shared
    cache = str(tmp_path / 'cache')
    copy = os.path.join(cache, 'models', os.path.basename(entry))
    shutil.copytree(entry, copy)
    assert model_loading.resolve_model_source(model_config, cache) == copy
    assert 'damaged' not in capsys.readouterr().out
    weights = os.path.join(copy, 'model.safetensors')
    size = truncate(weights)
    assert model_loading.resolve_model_source(model_config, cache) == copy
    out = capsys.readouterr().out
    assert f'model cache {copy} is damaged (model.safetensors is {size // 2} bytes, its manifest says {size}); ' \
           f'converting' in out, out
    assert os.path.getsize(weights) == size and manifests.manifest_problem(os.path.join(copy, 'manifest.json')) is None
    corrupt_tail(weights)
    model_loading.resolve_model_source(model_config, cache)
    out = capsys.readouterr().out
    assert 'model.safetensors has the size its manifest says but other contents' in out, out
    from safetensors.torch import load_file
    rebuilt, original = load_file(weights), load_file(os.path.join(entry, 'model.safetensors'))
    assert rebuilt.keys() == original.keys() and all((rebuilt[k] == original[k]).all() for k in original)
    assert not [n for n in os.listdir(os.path.dirname(copy)) if '.tmp' in n], 'leftovers of the rebuild'


def script(*args):
    proc = subprocess.run([sys.executable, '-u', *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'),
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and 'Traceback' not in out, out[-4000:]
    return out


def test_demo_pairs_are_rebuilt_when_truncated_or_corrupted(tmp_path):
    out = str(tmp_path / 'demo' / 'pairs.jsonl')
    build = ['demo/sentiment.py', 'build', '--out', out, '--n-prompts', '3', '--n-test-prompts', '1',
             '--max-new-tokens', '6', '--min-gap', '-1', '--model', 'tiny', '--batch-size', '8']
    script(*build)
    test_out, first = out[:-len('.jsonl')] + '_test.jsonl', open(out).read()
    assert 'skipping' in script(*build)
    size = truncate(out)
    log = script(*build)
    assert f'build: the cached pairs {out} are damaged (pairs.jsonl is {size // 2} bytes, its manifest says {size}); ' \
           f'building them again' in log, log[-3000:]
    assert open(out).read() == first  # seeded: the same pairs again
    corrupt_tail(test_out, n=4)
    log = script(*build)
    assert 'pairs_test.jsonl has the size its manifest says but other contents' in log, log[-3000:]
    assert 'skipping' in script(*build)


def test_evaluation_result_is_verified_before_a_rerun_skips_it(tmp_path):
    from helpers import write_hh_file
    pairs, out = write_hh_file(tmp_path / 'pairs.jsonl', n=3), str(tmp_path / 'eval.json')
    args = ['evaluate.py', 'policy=model:tiny', 'reference=model:tiny', f'prompts={pairs}', f'out={out}',
            'samples_per_prompt=1', 'max_new_tokens=4', 'skip_evaluated=true']
    script(*args)
    first = json.load(open(out))
    assert f'evaluate: {out} exists and verifies; skipping' in script(*args)
    size = truncate(out)
    log = script(*args)
    assert f'evaluate: {out} is damaged (eval.json is {size // 2} bytes, its manifest says {size}); evaluating ' \
           f'again' in log, log[-3000:]
    again = json.load(open(out))
    assert {k: v for k, v in again.items() if k != 'seconds'} == {k: v for k, v in first.items() if k != 'seconds'}
    corrupt_tail(out, n=2)
    assert 'eval.json has the size its manifest says but other contents' in script(*args)
    assert 'exists and verifies; skipping' in script(*args)


def test_verify_command_for_shell_recipes(tmp_path):
    """`python checkpoints.py verify MANIFEST` (demo/sweep.sh skips SFT when the run's hf/ export verifies)."""
    entry = tmp_path / 'hf'
    entry.mkdir()
    (entry / 'config.json').write_text('{"a": 1}')
    manifests.write_manifest(str(entry / 'manifest.json'), [str(entry)])
    manifests.write_manifest(str(entry / 'manifest.json'), [str(entry)])  # sealed again: lists not itself
    verify = lambda path: subprocess.run([sys.executable, 'checkpoints.py', 'verify', path], cwd=ROOT,
                                         capture_output=True, text=True)
    proc = verify(str(entry / 'manifest.json'))
    assert proc.returncode == 0 and proc.stdout == '', proc.stdout + proc.stderr
    (entry / 'config.json').write_text('{"a": 2}')
    proc = verify(str(entry / 'manifest.json'))
    assert proc.returncode == 1 and proc.stdout == f'{entry} is damaged (config.json has the size its manifest says ' \
                                                    f'but other contents (its sha256 differs))\n', proc.stdout
    proc = verify(str(tmp_path / 'absent' / 'manifest.json'))
    assert proc.returncode == 1 and proc.stdout == ''
