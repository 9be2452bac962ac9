"""Resume, preemption and failure handling: a run killed with SIGKILL and resumed ends exactly where
an uninterrupted run ends; SIGUSR1 checkpoints and stops; a crash inside a checkpoint write leaves
the previous checkpoint loadable; non-finite updates are skipped, counted, and stop the run."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import trainers
import utils
from helpers import CACHE, ROOT, make_trainer, write_hh_file

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
    return torch.load(os.path.join(run_dir, 'LATEST', 'policy.pt'), weights_only=False)['state']


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
    checkpoint = utils.latest_checkpoint(run_dir)
    assert checkpoint is not None and not os.path.exists(os.path.join(run_dir, 'LATEST'))
    run(f'datasets=[{data}]', f'resume_from={checkpoint}')
    full, resumed = policy_state(uninterrupted), policy_state(run_dir)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_crash_inside_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, n_examples=8, batch_size=4)
    trainer.update(next(iter(trainer.train_batches())))
    trainer.checkpoint()
    first = os.path.join(trainer.run_dir, 'step-4')
    saved = torch.load(os.path.join(first, 'policy.pt'), weights_only=False)['state']
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
    assert utils.latest_checkpoint(trainer.run_dir) == first
    reloaded = torch.load(os.path.join(first, 'policy.pt'), weights_only=False)['state']
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    trainer.load_training_state(first)
    assert trainer.example_counter == 4 and trainer.batch_counter == 1


def test_disk_full_is_reported_and_previous_checkpoint_kept(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path)
    trainer.checkpoint()

    def full_disk(obj, path, *args, **kwargs):
        raise OSError(28, 'No space left on device')

    monkeypatch.setattr(torch, 'save', full_disk)
    trainer.example_counter = 4
    with pytest.raises(RuntimeError, match='disk full while writing checkpoint'):
        trainer.checkpoint()
    assert sorted(os.listdir(trainer.run_dir)) == ['step-0']


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
    state = torch.load(os.path.join(checkpoint, 'policy.pt'), weights_only=False)['state']
    assert torch.equal(state['lm_head.weight'], weights[5])
    with open(trainer.metrics_path) as f:
        logged = [json.loads(line) for line in f]
    assert logged[-1]['counters/nonfinite_updates'] == 4


def test_resume_finds_the_checkpoint_of_a_set_local_run_dir_with_interpolations(tmp_path):
    """A sweep names each run's directory from its overrides (local_run_dir=runs/beta${loss.beta}); resume=true
    must continue that directory, not look for the newest timestamped <exp_name>_* one."""
    import train
    from helpers import compose_config
    checkpoint = tmp_path / 'runs' / 'dpo_beta0.5' / 'step-8'
    checkpoint.mkdir(parents=True)
    torch.save({'example_counter': 8}, checkpoint / utils.CHECKPOINT_STATE)
    base = ['exp_name=never_used', 'loss=dpo', 'loss.beta=0.5', 'resume=true', f'local_dirs=[{tmp_path / "scratch"}]']
    config = compose_config(base + [f"local_run_dir='{tmp_path}/runs/dpo_beta${{loss.beta}}'"])
    assert train.resume_checkpoint(config) == str(checkpoint)
    config = compose_config(base)  # the default: a new timestamped directory, none to continue
    assert train.resume_checkpoint(config) is None
