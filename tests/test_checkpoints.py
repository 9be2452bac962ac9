"""checkpoints.py and the cache and run-directory safety around it, with real faults where this machine
allows them: a full disk (a small tmpfs, where mounting is permitted; else in-process fault injection,
which always runs too), real concurrent processes for the run-directory lock and the GGUF model cache,
truncated and torn files, the leftovers of a save killed between its renames, planted pickles that
would create a file when unpickled, and directories planted in a shared scratch directory."""
import collections
import errno
import getpass
import glob
import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import checkpoints
import disk
import run_dirs
import run_logging
import utils
from helpers import CACHE, ROOT, Payload, compose_config, plant, small_tmpfs, write_hh_file

STATE = {'policy.pt': {'w': torch.arange(6.0).reshape(2, 3)}, 'optimizer.pt': {'state': {}, 'param_groups': []}}


def save(run_dir, name, step, files=STATE):
    checkpoints.save(os.path.join(run_dir, name), step, files, {'example_counter': step, 'rng': utils.rng_state()})
    return os.path.join(run_dir, name)


# ---- writing and verifying ---------------------------------------------------------------------------------

def test_manifest_lists_every_file_and_verification_catches_damage(tmp_path):
    path = save(tmp_path, 'step-4', 4)
    with open(os.path.join(path, checkpoints.MANIFEST)) as f:
        manifest = json.load(f)
    assert manifest['step'] == 4
    assert manifest['files'] == {n: os.path.getsize(os.path.join(path, n))
                                 for n in ('optimizer.pt', 'policy.pt', checkpoints.TRAINING_STATE)}
    assert checkpoints.verify(path) == 4
    policy = os.path.join(path, 'policy.pt')
    size = os.path.getsize(policy)
    with open(policy, 'r+b') as f:
        f.truncate(size // 2)
    with pytest.raises(checkpoints.Unverified, match=f'policy.pt is {size // 2} bytes, its manifest says {size}'):
        checkpoints.verify(path)
    os.remove(policy)
    with pytest.raises(checkpoints.Unverified, match='policy.pt is missing'):
        checkpoints.verify(path)
    os.remove(os.path.join(path, checkpoints.MANIFEST))
    with pytest.raises(checkpoints.Unverified, match='no manifest.json'):
        checkpoints.verify(path)


def test_resume_skips_a_truncated_newest_checkpoint_and_says_why(tmp_path, capsys):
    run_dir = str(tmp_path)
    save(run_dir, 'step-4', 4)
    newest = save(run_dir, 'step-8', 8)
    policy = os.path.join(newest, 'policy.pt')
    size = os.path.getsize(policy)
    with open(policy, 'r+b') as f:
        f.truncate(100)
    assert checkpoints.resume_point(run_dir) == os.path.join(run_dir, 'step-4')
    assert f'resume: skipped {newest}: policy.pt is 100 bytes, its manifest says {size}' in capsys.readouterr().out


def test_resume_skips_a_checkpoint_that_verifies_but_cannot_be_read(tmp_path, capsys):
    """Same sizes, damaged content (the manifest holds sizes, not hashes): the check that unpickles every
    file skips it."""
    run_dir = str(tmp_path)
    save(run_dir, 'step-4', 4)
    newest = save(run_dir, 'step-8', 8)
    with open(os.path.join(newest, 'policy.pt'), 'r+b') as f:
        f.seek(-30, os.SEEK_END)
        f.write(b'\0' * 30)  # the zip's end-of-central-directory record
    assert checkpoints.resume_point(run_dir) == os.path.join(run_dir, 'step-4')
    assert f'resume: skipped {newest}: ' in capsys.readouterr().out


def test_resume_with_only_damaged_checkpoints_stops_instead_of_starting_over(tmp_path):
    path = save(tmp_path, 'step-4', 4)
    os.remove(os.path.join(path, 'policy.pt'))
    with pytest.raises(checkpoints.CheckpointError, match='no checkpoint in .* can be loaded'):
        checkpoints.resume_point(str(tmp_path))
    shutil.rmtree(path)
    os.makedirs(tmp_path / 'step-8.tmp-123')  # only the leftover of an interrupted first save: start over
    assert checkpoints.resume_point(str(tmp_path)) is None


@pytest.mark.parametrize('leftovers', ['old and tmp', 'old only'])
def test_a_save_killed_between_its_renames_is_recovered(tmp_path, monkeypatch, capsys, leftovers):
    """Replacing an existing checkpoint renames it to .old-PID, then the new one into place: a kill between
    the two leaves no step-8/ at all. Resume finds the complete leftover and gives it its name back."""
    run_dir = str(tmp_path)
    save(run_dir, 'step-4', 4)
    save(run_dir, 'step-8', 8)
    real_replace, calls = os.replace, []

    def dying_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt('killed between the renames')
        return real_replace(src, dst)

    monkeypatch.setattr(os, 'replace', dying_replace)
    with pytest.raises(KeyboardInterrupt):
        save(run_dir, 'step-8', 8, {'policy.pt': {'w': torch.ones(2)}})
    monkeypatch.setattr(os, 'replace', real_replace)
    pid = os.getpid()
    assert sorted(os.listdir(run_dir)) == ['step-4', f'step-8.old-{pid}', f'step-8.tmp-{pid}']
    if leftovers == 'old only':
        shutil.rmtree(os.path.join(run_dir, f'step-8.tmp-{pid}'))
    chosen = checkpoints.resume_point(run_dir)
    assert chosen == os.path.join(run_dir, 'step-8') and checkpoints.verify(chosen) == 8
    leftover = f'step-8.tmp-{pid}' if leftovers == 'old and tmp' else f'step-8.old-{pid}'
    assert f'resume: {leftover} was left by an interrupted save; renamed it to {chosen}' in capsys.readouterr().out
    expected = torch.ones(2) if leftovers == 'old and tmp' else STATE['policy.pt']['w']  # the newest complete one
    assert torch.equal(checkpoints.load_state(os.path.join(chosen, 'policy.pt'))['w'], expected)


def test_prune_keeps_the_newest_verified_checkpoints_and_removes_dead_leftovers(tmp_path):
    run_dir = str(tmp_path)
    for step in (4, 8, 12):
        save(run_dir, f'step-{step}', step)
    broken = save(run_dir, 'step-16', 16)
    os.remove(os.path.join(broken, checkpoints.MANIFEST))
    os.makedirs(os.path.join(run_dir, 'step-20.tmp-1'))
    checkpoints.prune(run_dir, keep=2)
    assert sorted(os.listdir(run_dir)) == ['step-12', 'step-16', 'step-8']  # damaged step-16 is left alone


def test_torn_last_metrics_line_is_dropped(tmp_path, capsys):
    path = str(tmp_path / 'metrics.jsonl')
    lines = [json.dumps({'split': 'train', 'step': s, 'loss': 0.5}) + '\n' for s in (2, 4, 6, 8)]
    with open(path, 'w') as f:
        f.writelines(lines)
        f.write('{"split": "train", "step": 10, "lo')  # a kill in the middle of a write
    run_logging.truncate_metrics(path, 6)
    with open(path) as f:
        assert f.read() == ''.join(lines[:3])
    assert f'resume: dropped 1 torn line(s) of {path}' in capsys.readouterr().out


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)  # numpy now holds a cached gaussian
    torch.save(utils.rng_state(), tmp_path / 'rng.pt')
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    utils.set_rng_state(checkpoints.load_file(str(tmp_path / 'rng.pt')))
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


# ---- a full disk ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('sharded', [False, True])
def test_disk_full_on_a_real_tmpfs(tmp_path, sharded):
    """A real full disk: torch's zip writer fails with '[enforce fail at inline_container.cc]' (no errno),
    torch.distributed.checkpoint with its own error. Both: DiskFullError, the partial directory removed,
    the previous checkpoint intact."""
    with small_tmpfs(tmp_path / 'disk', '3m') as run_dir:
        small = {'policy.pt': {'w': torch.zeros(1000)}}
        save(run_dir, 'step-4', 4, small)
        big = torch.zeros(1_000_000)  # 4 MB
        with pytest.raises(checkpoints.DiskFullError) as e:
            checkpoints.save(os.path.join(run_dir, 'step-8'), 8, {} if sharded else {'policy.pt': {'w': big}},
                             {'example_counter': 8}, sharded={'policy': {'w': big}} if sharded else None)
        message = str(e.value)
        assert message.startswith(f'disk full while writing checkpoint {run_dir}/step-8 (') and '\n' not in message
        assert f'removed the partial step-8.tmp-{os.getpid()}' in message
        assert sorted(os.listdir(run_dir)) == ['step-4'], 'the partial directory must be removed'
        assert checkpoints.verify(os.path.join(run_dir, 'step-4')) == 4


@pytest.mark.parametrize('fault', ['enospc', 'zip writer'])
def test_disk_full_by_fault_injection(tmp_path, monkeypatch, fault):
    """The same, without a mount: torch.save fails as on a full disk (with ENOSPC, or as torch's zip writer
    does, without an errno while the file system reports no free space)."""
    run_dir = str(tmp_path)
    save(run_dir, 'step-4', 4)
    real_save, real_usage = torch.save, shutil.disk_usage

    def failing_save(obj, path, *args, **kwargs):
        with open(path, 'wb') as f:
            f.write(b'partial')
        if fault == 'enospc':
            raise OSError(28, 'No space left on device')
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')

    monkeypatch.setattr(torch, 'save', failing_save)
    if fault == 'zip writer':
        monkeypatch.setattr(shutil, 'disk_usage', lambda p: real_usage(p)._replace(free=0))
    with pytest.raises(checkpoints.DiskFullError, match='disk full while writing checkpoint'):
        save(run_dir, 'step-8', 8)
    monkeypatch.setattr(torch, 'save', real_save)
    assert sorted(os.listdir(run_dir)) == ['step-4']
    assert checkpoints.verify(os.path.join(run_dir, 'step-4')) == 4


def test_other_write_errors_clean_up_and_keep_their_traceback(tmp_path, monkeypatch):
    save(tmp_path, 'step-4', 4)
    monkeypatch.setattr(torch, 'save', lambda *a, **k: (_ for _ in ()).throw(TypeError('a bug')))
    with pytest.raises(TypeError, match='a bug'):
        save(tmp_path, 'step-8', 8)
    assert sorted(os.listdir(tmp_path)) == ['step-4']


# ---- loading without running code ------------------------------------------------------------------------

def test_a_planted_pickle_is_refused_with_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / 'pwned'
    path = str(tmp_path / 'policy.pt')
    plant(path, marker)
    with pytest.raises(checkpoints.UnsafeCheckpointError) as e:
        checkpoints.load_archive(path)
    assert str(e.value) == (f'refusing to load {path}: unpickling it could run code (it needs exec); '
                            f'if you trust this file, set trust_checkpoint_code=true to load it anyway')
    assert not marker.exists()
    with open(path, 'wb') as f:  # a plain pickle (not torch.save's zip) is refused the same way
        pickle.dump({'state': Payload(marker)}, f)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match='trust_checkpoint_code=true'):
        checkpoints.load_archive(path)
    assert not marker.exists()


def test_trust_checkpoint_code_loads_a_file_that_needs_more_than_weights(tmp_path):
    path = str(tmp_path / 'policy.pt')
    torch.save({'step_idx': 4, 'state': {'w': torch.ones(2)}, 'metrics': {'loss': np.float64(0.5)}}, path)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match='numpy'):
        checkpoints.load_archive(path)
    assert checkpoints.load_archive(path, trust=True)['metrics']['loss'] == 0.5


def test_a_reference_format_archive_written_by_plain_torch_save_loads(tmp_path):
    """The reference code saves {'step_idx', 'state': policy.state_dict(), 'metrics'}: an OrderedDict with
    _metadata, metrics as Python floats. It loads weights_only, into train.py's models (policy and reference)."""
    config = compose_config(['model=tiny', 'loss=tdpo', 'exp_name=x', f'local_dirs=[{CACHE}]'])
    import models
    from sharded_trainers import TRAINERS
    model = models.build_models(config, TRAINERS[config.trainer])[0]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    state = model.state_dict()
    assert isinstance(state, collections.OrderedDict) and hasattr(state, '_metadata')
    path = str(tmp_path / 'policy.pt')
    torch.save({'step_idx': 160, 'state': state, 'metrics': {'loss/eval': 0.69}}, path)
    config.model.archive = path
    policy, reference = models.build_models(config, TRAINERS[config.trainer])
    for k, v in state.items():
        assert torch.equal(policy.state_dict()[k], v) and torch.equal(reference.state_dict()[k], v)


def test_sharded_checkpoints_load_without_running_code(tmp_path):
    """torch.distributed.checkpoint pickles its .metadata and non-tensor values: a real one loads through the
    allow-listed reader; planted ones are refused. (In one process: dcp needs no process group.)"""
    import torch.distributed.checkpoint as dcp
    marker = tmp_path / 'pwned'
    state = {'policy': {'w': torch.randn(4, 3)}, 'optimizer': {'param_groups': [{'lr': 0.1, 'betas': (0.9, 0.99)}]}}
    checkpoints.save(str(tmp_path / 'step-4'), 4, {}, {'example_counter': 4}, sharded=state)
    target = {'policy': {'w': torch.zeros(4, 3)}, 'optimizer': {'param_groups': [{'lr': 0.0, 'betas': (0.0, 0.0)}]}}
    checkpoints.load_sharded(str(tmp_path / 'step-4'), target)
    assert torch.equal(target['policy']['w'], state['policy']['w']) and target['optimizer'] == state['optimizer']
    checkpoints.check_loadable(str(tmp_path / 'step-4'))

    evil = str(tmp_path / 'evil')
    dcp.save({'policy': {'w': torch.ones(2)}, 'x': Payload(marker)}, checkpoint_id=os.path.join(evil, 'sharded'))
    with pytest.raises(checkpoints.UnsafeCheckpointError, match='refusing to load .*trust_checkpoint_code=true'):
        checkpoints.load_sharded(evil, {'policy': {'w': torch.zeros(2)}, 'x': None})
    metadata = os.path.join(evil, 'sharded', '.metadata')
    with open(metadata, 'wb') as f:
        pickle.dump(Payload(marker), f)
    with pytest.raises(checkpoints.UnsafeCheckpointError, match=f'refusing to load {metadata}: .*builtins.exec'):
        checkpoints.load_sharded(evil, {'policy': {'w': torch.zeros(2)}})
    assert not marker.exists()


def run_script(*args, expect=0, env=None):
    proc = subprocess.run([sys.executable, '-u', *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-4000:]
    return out


def assert_refused_in_one_line(out, path):
    lines = [line for line in out.splitlines() if 'refusing to load' in line]
    assert lines and lines[-1].endswith(f'refusing to load {path}: unpickling it could run code (it needs '
                                        f'exec); if you trust this file, set trust_checkpoint_code=true '
                                        f'to load it anyway'), out[-3000:]
    assert 'Traceback' not in out, out[-3000:]


def test_a_planted_model_archive_stops_train_py_before_anything_is_written(tmp_path):
    marker, archive, run_dir = tmp_path / 'pwned', str(tmp_path / 'policy.pt'), tmp_path / 'run'
    plant(archive, marker)
    out = run_script('train.py', 'model=tiny', f'local_dirs=[{CACHE}]', 'loss=sft', 'exp_name=evil',
                     f'datasets=[{write_hh_file(tmp_path / "pairs.jsonl")}]', f'local_run_dir={run_dir}',
                     f'model.archive={archive}', 'wandb.enabled=false', expect=1)
    assert_refused_in_one_line(out, archive)
    assert not marker.exists() and not run_dir.exists()


def test_a_planted_checkpoint_stops_evaluate_py(tmp_path):
    marker, checkpoint = tmp_path / 'pwned', tmp_path / 'run' / 'LATEST'
    os.makedirs(checkpoint)
    plant(str(checkpoint / 'policy.pt'), marker)
    out = run_script('evaluate.py', f'policy={checkpoint}', 'reference=model:tiny',
                     f'prompts={write_hh_file(tmp_path / "pairs.jsonl", n=3)}', expect=1)
    assert_refused_in_one_line(out, checkpoint / 'policy.pt')
    assert not marker.exists() and not (checkpoint / 'eval.json').exists()


# ---- the run-directory lock and the GGUF cache: real concurrent processes -----------------------------------

HOLD_LOCK = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {root!r})
    import run_dirs
    lock = run_dirs.RunDirLock(sys.argv[1])
    print('locked', flush=True)
    time.sleep(600)
''')


def test_run_dir_lock_names_the_holder_and_a_dead_holder_blocks_nothing(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK.format(root=ROOT), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        with pytest.raises(run_dirs.RunDirBusy) as e:
            run_dirs.RunDirLock(str(tmp_path))
        import socket
        assert str(e.value) == (f'run directory {tmp_path} is in use by host {socket.gethostname()} pid {holder.pid}: '
                                f'another launch of this run is writing to it; wait for it to end or stop it')
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = run_dirs.RunDirLock(str(tmp_path))  # the dead process's lock went with it
    with open(tmp_path / run_dirs.LOCK_FILE) as f:
        assert f.read() == f'host {socket.gethostname()} pid {os.getpid()}\n'
    lock.release()


CONVERT = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {root!r})
    import torch.distributed as dist
    import distributed
    import model_loading
    from helpers import compose_config
    if 'RANK' in os.environ:  # torchrun: as in train.py, the cache is first used with the process group up
        distributed.init_distributed(int(os.environ['RANK']), int(os.environ['WORLD_SIZE']))
        if dist.get_rank() == 0:
            time.sleep(3)  # rank 1 converts: transformers writes model files on rank 0 only, unless told
    config = compose_config(['model=tiny', 'exp_name=x'])
    model_loading.load_model(config.model, 'float32', sys.argv[1])
    print('target', model_loading.resolve_model_source(config.model, sys.argv[1]), flush=True)
''')


@pytest.mark.parametrize('launch', ['torchrun ranks', 'two jobs'])
def test_concurrent_first_use_of_the_gguf_cache(tmp_path, launch):
    """Two processes (torchrun's ranks, or two jobs on a node) dequantize the GGUF model into a fresh cache at
    once: both get the complete model (the old code's second rename failed with 'Directory not empty')."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.path.join(ROOT, 'tests'))
    script = tmp_path / 'convert.py'
    script.write_text(CONVERT.format(root=ROOT))
    cache = str(tmp_path / 'cache')
    if launch == 'torchrun ranks':
        commands = [[sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2',
                     str(script), cache]]
    else:
        commands = [[sys.executable, str(script), cache]] * 2
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), '\n'.join(o[-3000:] for o in outs)
    lines = [line for o in outs for line in o.splitlines()]
    targets = {line.split(' ', 1)[1] for line in lines if line.startswith('target ')}
    assert len(targets) == 1 and sum(line.startswith('target ') for line in lines) == 2
    target = targets.pop()
    assert sum(line.startswith('converting ') for line in lines) == 1, 'exactly one process converts'
    assert any(line.startswith('waiting for another process to finish converting') for line in lines)
    assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(os.listdir(target))
    assert [d for d in os.listdir(os.path.dirname(target)) if '.tmp' in d] == []


# ---- shared scratch directories ---------------------------------------------------------------------------

def test_local_dir_is_private_and_follows_no_planted_symlink(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))  # the fallback ~/.cache/tdpo
    user = getpass.getuser()
    shared, other = tmp_path / 'scr', tmp_path / 'elsewhere'
    os.makedirs(shared), os.makedirs(other)
    os.chmod(shared, 0o1777)  # like /scr: everyone may create names in it
    old_umask = os.umask(0o027)
    try:
        assert utils.get_local_dir([str(shared), str(tmp_path / 'cache')]) == str(shared / user)
        assert os.stat(shared / user).st_mode & 0o777 == 0o750, 'created with the user umask'
        os.rmdir(shared / user)
        os.symlink(other, shared / user)  # planted by another user
        os.lchown(shared / user, 4242, 4242)
        assert utils.get_local_dir([str(shared), str(tmp_path / 'cache')]) == str(tmp_path / 'cache' / user)
        assert f'warning: not using {shared / user}: it is a symbolic link (to {other}) made by uid 4242' \
            in capsys.readouterr().out
        os.remove(shared / user)
        os.makedirs(shared / user)
        os.chown(shared / user, 4242, 4242)  # a directory another user made under the user's name
        fallback = utils.get_local_dir([str(shared)])  # the last entry is unusable: ~/.cache/tdpo
        assert fallback == str(tmp_path / 'home' / '.cache' / 'tdpo') and utils.private_dir_problem(fallback) is None
        assert f'warning: not using {shared / user}: it belongs to uid 4242, not to you' in capsys.readouterr().out
        assert os.listdir(other) == [], 'nothing may be written through the planted link'
    finally:
        os.umask(old_umask)


def test_train_py_refuses_a_run_dir_of_another_user(tmp_path):
    run_dir = tmp_path / 'run'
    os.makedirs(run_dir)
    os.chown(run_dir, 4242, 4242)
    out = run_script('train.py', 'model=tiny', f'local_dirs=[{CACHE}]', 'loss=sft', 'exp_name=x', 'n_examples=4',
                     f'datasets=[{write_hh_file(tmp_path / "pairs.jsonl")}]', f'local_run_dir={run_dir}',
                     'wandb.enabled=false', expect=1)
    assert f'config error: local_run_dir={run_dir} belongs to uid 4242, not to you' in out and 'Traceback' not in out
    assert os.listdir(run_dir) == []


def test_model_cache_on_a_full_disk_is_one_line(tmp_path):
    """First launch with local_dirs on a disk too small for the dequantized GGUF model (a real 40 MB tmpfs):
    train.py stops with one line saying so, and leaves no partial copy in the cache."""
    pairs = write_hh_file(tmp_path / 'pairs.jsonl', n=8)
    with small_tmpfs(tmp_path / 'disk', '40m') as disk:
        proc = subprocess.run([sys.executable, '-u', 'train.py', 'model=tiny', 'loss=sft', 'exp_name=full',
                               f'local_dirs=[{disk}]', f'local_run_dir={tmp_path}/run', f'datasets=[{pairs}]',
                               'wandb.enabled=false', 'n_examples=4', 'batch_size=2'],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
        assert last.startswith('disk full while converting ') and 'MiB free there' in last, proc.stderr[-3000:]
        leftovers = [p for p in glob.glob(f'{disk}/**/*', recursive=True) if '.tmp' in os.path.basename(p)]
        assert leftovers == [], leftovers


def test_disk_full_is_recognised_through_wrapping_errors():
    """safetensors' writer reports ENOSPC as its own error ('... No space left on device (os error 28)'),
    transformers may wrap it; a plain error with space left is not a full disk."""
    wrapped = RuntimeError('save failed')
    wrapped.__cause__ = Exception('Error while serializing: I/O error: No space left on device (os error 28)')
    assert disk.looks_like_disk_full(disk.exception_chain(wrapped), free=2**30)
    assert disk.looks_like_disk_full(disk.exception_chain(OSError(errno.EDQUOT, 'Disk quota exceeded')), free=2**30)
    assert disk.looks_like_disk_full(disk.exception_chain(RuntimeError('unexpected pos')), free=0)
    assert not disk.looks_like_disk_full(disk.exception_chain(PermissionError(13, 'Permission denied')), free=2**30)
