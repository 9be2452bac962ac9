"""Resume, preemption and failure handling, through train.py as users run it: a run killed with SIGKILL
and resumed ends exactly where an uninterrupted run ends; SIGUSR1 checkpoints and stops; a crash inside a
checkpoint write leaves the previous checkpoint loadable; non-finite updates are skipped, counted, and stop
the run; truncated checkpoints are skipped, a torn metrics line dropped, the checkpoint just loaded never
rewritten; a second launch of a run stops at once; a full disk stops the run with one line; a planted
checkpoint stops resume without running."""
import getpass
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoints
import trainers
from helpers import CACHE, ROOT, make_trainer, plant, small_tmpfs, write_hh_file

RUN = ['model=tiny', f'local_dirs=[{CACHE}]', 'loss=tdpo', 'batch_size=2', 'eval_batch_size=4', 'max_length=48',
       'max_prompt_length=24', 'n_examples=24', 'eval_every=8', 'n_eval_examples=4', 'eval_fraction=0.25',
       'checkpoint_every=4', 'minimum_log_interval_secs=0', 'sample_during_eval=true', 'n_eval_model_samples=2',
       'wandb.enabled=false', 'exp_name=rel', 'lr=1e-3', 'warmup_steps=2']
TIMING_KEYS = ('examples_per_second',)


def command(*args):
    return [sys.executable, '-u', 'train.py', *RUN, *args]


def run(*args, expect=0):
    proc = subprocess.run(command(*args), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == expect, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]


def wait_for_step(proc, run_dir, step, timeout=300):
    """Poll metrics.jsonl until a training line at `step` or later appears."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, 'training ended before the kill'
        path = os.path.join(run_dir, 'metrics.jsonl')
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line)['step'] for line in f if line.endswith('\n') and '"train"' in line]
            if steps and steps[-1] >= step:
                return steps[-1]
        time.sleep(0.02)
    raise TimeoutError(f'no step {step} within {timeout}s')


def policy_state(run_dir):
    return torch.load(os.path.join(run_dir, 'LATEST', 'policy.pt'), weights_only=True)['state']


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return write_hh_file(tmp_path_factory.mktemp('data') / 'pairs.jsonl')


@pytest.fixture(scope='module')
def uninterrupted(data, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp('full') / 'run')
    run(f'datasets=[{data}]', f'local_run_dir={run_dir}')
    return run_dir


def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(data, uninterrupted, tmp_path):
    run_dir = str(tmp_path / 'run')
    kill_after = random.Random().randrange(3, 11) * 2  # examples; a fresh draw each run
    proc = subprocess.Popen(command(f'datasets=[{data}]', f'local_run_dir={run_dir}', 'keep_checkpoints=2'),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        killed_at = wait_for_step(proc, run_dir, kill_after)
    finally:
        proc.kill()
        proc.wait()
    print(f'killed after {killed_at} examples (target {kill_after})')
    out = run(f'datasets=[{data}]', f'local_run_dir={run_dir}', 'keep_checkpoints=2', 'resume=true')
    assert 'resumed from' in out
    full, resumed = policy_state(uninterrupted), policy_state(run_dir)
    assert all(torch.equal(full[k], resumed[k]) for k in full), 'final weights differ from the uninterrupted run'
    assert metrics(run_dir) == metrics(uninterrupted)
    with open(os.path.join(run_dir, 'samples.jsonl')) as f, open(os.path.join(uninterrupted, 'samples.jsonl')) as g:
        assert f.read().splitlines()[-2:] == g.read().splitlines()[-2:], 'sampling RNG not restored'
    steps = sorted(d for d in os.listdir(run_dir) if d.startswith('step-'))
    assert steps == ['step-16', 'step-20'], steps  # keep_checkpoints=2


def test_sigusr1_checkpoints_and_stops_then_resume_from_finishes(data, uninterrupted, tmp_path):
    run_dir = str(tmp_path / 'run')
    proc = subprocess.Popen(command(f'datasets=[{data}]', f'local_run_dir={run_dir}'), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_step(proc, run_dir, 6)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert 'received signal' in out and 'checkpoint in' in out
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoint is not None and not os.path.exists(os.path.join(run_dir, 'LATEST'))
    run(f'datasets=[{data}]', f'resume_from={checkpoint}')
    full, resumed = policy_state(uninterrupted), policy_state(run_dir)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_crash_inside_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, n_examples=8, batch_size=4)
    trainer.update(next(iter(trainer.train_batches())))
    trainer.checkpoint()
    first = os.path.join(trainer.run_dir, 'step-4')
    saved = torch.load(os.path.join(first, 'policy.pt'), weights_only=True)['state']
    trainer.update(next(iter(trainer.train_batches())))
    real_save, calls = torch.save, []

    def dying_save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt('killed mid-write')  # not an OSError: nothing cleans up, as after SIGKILL
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, 'save', dying_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.checkpoint()
    monkeypatch.setattr(torch, 'save', real_save)
    assert not os.path.exists(os.path.join(trainer.run_dir, 'step-8'))
    assert any('.tmp-' in d for d in os.listdir(trainer.run_dir)), 'the partial write should be left behind'
    assert checkpoints.latest_checkpoint(trainer.run_dir) == first
    reloaded = torch.load(os.path.join(first, 'policy.pt'), weights_only=True)['state']
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    trainer.load_training_state(first)
    assert trainer.example_counter == 4 and trainer.batch_counter == 1


def test_nonfinite_updates_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, n_examples=40, max_nonfinite_updates=3)
    real = trainer.get_batch_metrics
    poisoned = {2, 4, 5, 6}  # update 2 alone, then 4, 5, 6 in a row

    def get_batch_metrics(batch, train=True):
        loss, metrics = real(batch, train)
        return (loss * float('nan') if trainer.batch_counter + 1 in poisoned else loss), metrics

    monkeypatch.setattr(trainer, 'get_batch_metrics', get_batch_metrics)
    weights = []
    real_update = trainer.update
    monkeypatch.setattr(trainer, 'update', lambda batch: (real_update(batch),
                                                           weights.append(trainer.policy.lm_head.weight.clone())))
    with pytest.raises(trainers.NonFiniteError, match='3 updates in a row'):
        trainer.train()
    assert trainer.batch_counter == 6 and trainer.nonfinite_updates == 4
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    assert torch.equal(weights[2], weights[5]), 'a skipped update changed the weights'
    checkpoint = os.path.join(trainer.run_dir, 'step-24')
    state = torch.load(os.path.join(checkpoint, 'policy.pt'), weights_only=True)['state']
    assert torch.equal(state['lm_head.weight'], weights[5])
    with open(trainer.metrics_path) as f:
        logged = [json.loads(line) for line in f]
    assert logged[-1]['counters/nonfinite_updates'] == 4


def test_resume_finds_the_checkpoint_of_a_set_local_run_dir_with_interpolations(tmp_path):
    """A sweep names each run's directory from its overrides (local_run_dir=runs/beta${loss.beta}); resume=true
    must continue that directory, not look for the newest timestamped <exp_name>_* one."""
    import run_dirs
    from helpers import compose_config
    run_dir = tmp_path / 'runs' / 'dpo_beta0.5'
    checkpoints.save(str(run_dir / 'step-8'), 8, {'optimizer.pt': {}}, {'example_counter': 8})
    base = ['exp_name=never_used', 'loss=dpo', 'loss.beta=0.5', 'resume=true', f'local_dirs=[{tmp_path / "scratch"}]']
    config = compose_config(base + [f"local_run_dir='{tmp_path}/runs/dpo_beta${{loss.beta}}'"])
    run_dirs.resume_run_dir(config)
    assert config.local_run_dir == str(run_dir) and run_dirs.choose_checkpoint(config) == str(run_dir / 'step-8')
    config = compose_config(base)  # the default: a new timestamped directory, none to continue
    run_dirs.resume_run_dir(config)
    assert os.path.dirname(config.local_run_dir) == str(tmp_path / 'scratch' / getpass.getuser())


# ---- damaged checkpoints, torn metrics, second launches, full disks, planted files: train.py end to end ----

def copy_run(run_dir, tmp_path):
    copy = str(tmp_path / 'run')
    shutil.copytree(run_dir, copy)
    return copy


def file_identity(path):
    st = os.stat(path)
    return st.st_ino, st.st_mtime_ns, st.st_size


def test_resume_falls_back_from_truncated_checkpoints_and_never_rewrites_the_one_it_loads(data, uninterrupted, tmp_path):
    """The newest checkpoints (LATEST/ and step-20/) have a truncated policy.pt: resume=true says which were
    skipped and why, continues step-16 (without writing it again) and ends as the uninterrupted run."""
    run_dir = copy_run(uninterrupted, tmp_path)
    for name in ('LATEST', 'step-20'):
        with open(os.path.join(run_dir, name, 'policy.pt'), 'r+b') as f:
            f.truncate(1000)
    loaded = os.path.join(run_dir, 'step-16')
    before = {name: file_identity(os.path.join(loaded, name)) for name in os.listdir(loaded)}
    out = run(f'datasets=[{data}]', f'local_run_dir={run_dir}', 'resume=true')
    size = os.path.getsize(os.path.join(uninterrupted, 'LATEST', 'policy.pt'))
    for name in ('LATEST', 'step-20'):
        assert f'resume: skipped {run_dir}/{name}: policy.pt is 1000 bytes, its manifest says {size}' in out, out[-3000:]
    assert f'resumed from {loaded} after 16 examples' in out
    assert {name: file_identity(os.path.join(loaded, name)) for name in os.listdir(loaded)} == before
    full, resumed = policy_state(uninterrupted), policy_state(run_dir)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert metrics(run_dir) == metrics(uninterrupted)


def test_resume_tolerates_a_torn_last_metrics_line(data, uninterrupted, tmp_path):
    run_dir = copy_run(uninterrupted, tmp_path)
    shutil.rmtree(os.path.join(run_dir, 'LATEST'))  # killed after step-20, in the middle of a metrics line
    with open(os.path.join(run_dir, 'metrics.jsonl'), 'a') as f:
        f.write('{"split": "train", "step": 26, "loss/tr')
    out = run(f'datasets=[{data}]', f'local_run_dir={run_dir}', 'resume=true')
    assert f'resume: dropped 1 torn line(s) of {run_dir}/metrics.jsonl' in out and 'resumed from' in out
    assert metrics(run_dir) == metrics(uninterrupted)


def test_resuming_a_finished_run_rewrites_nothing(data, uninterrupted, tmp_path):
    run_dir = copy_run(uninterrupted, tmp_path)
    latest = os.path.join(run_dir, 'LATEST')
    before = {name: file_identity(os.path.join(latest, name)) for name in os.listdir(latest)}
    out = run(f'datasets=[{data}]', f'local_run_dir={run_dir}', 'resume=true')
    assert f'resumed from {latest} after 24 examples' in out
    assert {name: file_identity(os.path.join(latest, name)) for name in os.listdir(latest)} == before


def test_two_launches_of_one_run_the_second_stops_at_once_naming_the_holder(data, tmp_path):
    """Two `train.py ... resume=true` of one run directory started together: the one that gets the lock
    trains; the other stops at once, naming the run directory and the holder; the log stays in order."""
    run_dir = str(tmp_path / 'run')
    args = command(f'datasets=[{data}]', f'local_run_dir={run_dir}', 'resume=true', 'keep_checkpoints=1')
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], '\n'.join(o[-2000:] for o in outs)
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    last_line = outs[loser].strip().splitlines()[-1]
    assert last_line == (f'run directory {run_dir} is in use by host {socket.gethostname()} pid {procs[winner].pid}: '
                         f'another launch of this run is writing to it; wait for it to end or stop it'), outs[loser][-2000:]
    assert 'Traceback' not in outs[loser]
    for split in ('train', 'eval'):
        steps = [m['step'] for m in metrics(run_dir) if m['split'] == split]
        assert steps == sorted(set(steps)), steps


def test_full_disk_stops_the_run_with_one_line_and_removes_the_partial_checkpoint(data, tmp_path):
    """A real 40 MB disk: config, metrics and step-4 (26 MB with RMSprop) fit, step-8 does not."""
    with small_tmpfs(tmp_path / 'disk', '40m') as disk:
        run_dir = os.path.join(disk, 'run')
        out = run(f'datasets=[{data}]', f'local_run_dir={run_dir}', 'keep_checkpoints=1', expect=1)
        # (on a line of its own, after the progress bars' cursor movements, which may redraw a bar after it)
        lines = [line[line.index('disk full'):] for line in out.splitlines() if 'disk full' in line]
        assert len(lines) == 1 and 'Traceback' not in out, out[-3000:]
        assert lines[0].startswith(f'disk full while writing checkpoint {run_dir}/step-8 (')
        assert lines[0].endswith('; the previous checkpoints are intact: free space, then rerun with resume=true')
        assert sorted(d for d in os.listdir(run_dir) if d.startswith('step-')) == ['step-4']
        assert checkpoints.verify(os.path.join(run_dir, 'step-4')) == 4


def test_a_planted_checkpoint_stops_resume_with_one_line(data, uninterrupted, tmp_path):
    """A training_state.pt that would create a file when unpickled, in the newest checkpoint, with a manifest
    that matches (whoever plants it can write that too): resume=true stops, and nothing is created."""
    run_dir = copy_run(uninterrupted, tmp_path)
    marker = tmp_path / 'pwned'
    state = os.path.join(run_dir, 'LATEST', checkpoints.TRAINING_STATE)
    plant(state, marker)
    with open(os.path.join(run_dir, 'LATEST', checkpoints.MANIFEST)) as f:
        manifest = json.load(f)
    manifest['files'][checkpoints.TRAINING_STATE] = os.path.getsize(state)
    with open(os.path.join(run_dir, 'LATEST', checkpoints.MANIFEST), 'w') as f:
        json.dump(manifest, f)
    out = run(f'datasets=[{data}]', f'local_run_dir={run_dir}', 'resume=true', expect=1)
    assert out.strip().splitlines()[-1] == (f'refusing to load {state}: unpickling it could run code (it needs exec); '
                                            f'if you trust this file, set trust_checkpoint_code=true to load it anyway')
    assert 'Traceback' not in out and not marker.exists()
