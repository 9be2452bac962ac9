"""A hung rank ends the job (torchrun, 2 CPU processes, gloo): rank 1 stops itself with SIGSTOP (alive and
silent, as a hung process) during an update or while a checkpoint is written, for FSDPTrainer and
TensorParallelTrainer. Rank 0 must exit non-zero within about collective_timeout_s (slow_phase_timeout_s in
a checkpoint write) with one line naming the collective and the silent rank, no checkpoint may be left
half-written under a final name, and resume=true must continue from the last complete checkpoint."""
import os
import subprocess
import time

import pytest

import checkpoints
from helpers import CACHE, ROOT, TORCHRUN, write_hh_file

ARGS = ['model=tiny', f'local_dirs=[{CACHE}]', 'loss=sft', 'batch_size=2', 'max_length=48', 'max_prompt_length=24',
        'n_examples=12', 'checkpoint_every=4', 'n_eval_examples=0', 'minimum_log_interval_secs=0',
        'wandb.enabled=false', 'exp_name=hang', 'collective_timeout_s=10', 'slow_phase_timeout_s=15']


def launch(script, args, env=None):
    start = time.time()
    proc = subprocess.run([*TORCHRUN, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=400,
                          env=dict(os.environ, OMP_NUM_THREADS='1', **(env or {})))
    return proc.returncode, proc.stdout + proc.stderr, time.time() - start


@pytest.mark.parametrize('phase', ['update', 'checkpoint'])
@pytest.mark.parametrize('trainer', ['FSDPTrainer', 'TensorParallelTrainer'])
def test_a_stopped_rank_ends_the_job_and_resume_continues(tmp_path, trainer, phase):
    run_dir = str(tmp_path / 'run')
    args = [*ARGS, f'trainer={trainer}', f'datasets=[{write_hh_file(tmp_path / "pairs.jsonl")}]', f'local_run_dir={run_dir}']
    code, out, seconds = launch(os.path.join('tests', 'stop_rank_worker.py'), args, {'STOP_RANK_AT': phase})
    assert code != 0, out[-4000:]
    # start, the stop, the timeout, 10 s naming the silent rank, then the stopped rank SIGKILLed as torchrun would
    # (stop_rank_worker.py's watchdog, without torchrun's 30 s); gloo's default timeout would be 30 minutes
    assert seconds < 240, seconds
    stopped_at = out.index('rank 1: stopping myself')
    lines = [line for line in out.splitlines() if 'another rank stopped answering' in line]
    assert len(lines) == 1, out[-4000:]
    line = lines[0][lines[0].index('rank 0: collective'):]
    bound = 10 if phase == 'update' else 15
    assert f'Timed out waiting {bound * 1000}ms' in line and 'Ranks 1 failed to pass monitoredBarrier' in line, line
    assert line.endswith('rerun with resume=true to continue from the last complete one'), line
    assert ('checkpoints.py:' in line) == (phase == 'checkpoint'), line
    assert 'train.py", line' not in out[stopped_at:] and 'trainers.py", line' not in out[stopped_at:], out[-4000:]
    # nothing half-written under a final name: every step-N/ verifies; the interrupted one only as .tmp-<pid>
    finals = sorted(d for d in os.listdir(run_dir) if d.startswith('step-') and '.' not in d)
    assert finals == ['step-4'] and checkpoints.verify(os.path.join(run_dir, 'step-4')) == 4, os.listdir(run_dir)
    assert not os.path.exists(os.path.join(run_dir, 'LATEST'))

    code, out, _ = launch('train.py', [*args, 'resume=true'])
    assert code == 0, out[-4000:]
    assert f'resumed from {run_dir}/step-4 after 4 examples' in out
    assert checkpoints.verify(os.path.join(run_dir, 'LATEST')) == 12
    assert not [d for d in os.listdir(run_dir) if '.tmp-' in d], 'the interrupted write should be pruned'
