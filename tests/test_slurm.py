"""A real (single-node) Slurm cluster runs the project's sbatch scripts and Hydra's submitit launcher:
a 2-process TDPO job on CPU through slurm/multi_node.sbatch (srun + torchrun rendezvous from the Slurm
environment), an SFT job through slurm/single_node.sbatch, and one `train.py -m hydra/launcher=slurm` run.
`bash slurm/cluster.sh start` starts the cluster (.ci/run does it first); this module does it if needed."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import CACHE, ROOT, write_hh_file

TINY = ['model=tiny', f'local_dirs=[{CACHE}]', 'batch_size=4', 'eval_batch_size=4', 'max_length=64',
        'max_prompt_length=32', 'n_examples=8', 'n_eval_examples=0', 'optimizer=SGD', 'lr=1e-2', 'warmup_steps=0',
        'minimum_log_interval_secs=0', 'wandb.enabled=false']
# CPU processes instead of GPUs, on this machine's 2 cores
SBATCH_CPU = ['--nodes=1', '--gpus-per-node=0', '--cpus-per-task=2', '--mem=8G', '--time=15',
              f'--export=ALL,NPROC_PER_NODE=2,PYTHON={sys.executable},OMP_NUM_THREADS=1,HF_HUB_OFFLINE=1']


@pytest.fixture(scope='module')
def slurm_cluster():
    if shutil.which('sbatch') is None or subprocess.run(['sinfo'], capture_output=True).returncode != 0:
        subprocess.run(['bash', os.path.join(ROOT, 'slurm', 'cluster.sh'), 'start'], check=True, timeout=900)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def sbatch(script, args, tmp_path):
    output = tmp_path / f'{os.path.basename(script)}.out'
    job_name = f'test_{os.getpid()}_{script}'
    try:
        proc = subprocess.run(['sbatch', '--wait', f'--job-name={job_name}', f'--output={output}', *SBATCH_CPU,
                               os.path.join('slurm', script), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        subprocess.run(['scancel', f'--name={job_name}'])
        raise
    log = output.read_text() if output.exists() else ''
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-6000:]
    return log


def test_sbatch_scripts_train_on_two_processes(slurm_cluster, tmp_path):
    data = write_hh_file(tmp_path / 'pairs.jsonl')
    tdpo_dir = str(tmp_path / 'tdpo')
    log = sbatch('multi_node.sbatch', [*TINY, 'loss=tdpo', f'datasets=[{data}]', 'exp_name=slurm_tdpo',
                                       f'local_run_dir={tdpo_dir}'], tmp_path)
    assert 'FSDPTrainer' in log and f'run directory: {tdpo_dir}' in log
    train_lines = [m for m in read_metrics(tdpo_dir) if m['split'] == 'train']
    assert [m['step'] for m in train_lines] == [4, 8] and 'rewards_train/accuracies' in train_lines[0]
    assert os.path.exists(os.path.join(tdpo_dir, 'LATEST', 'policy.pt'))

    sft_dir = str(tmp_path / 'sft')
    sbatch('single_node.sbatch', [*TINY, 'loss=sft', f'datasets=[{data}]', 'exp_name=slurm_sft',
                                  f'local_run_dir={sft_dir}', 'n_examples=4'], tmp_path)
    assert [m['step'] for m in read_metrics(sft_dir)] == [4]
    assert os.path.exists(os.path.join(sft_dir, 'hf', 'config.json'))


def test_hydra_submitit_launcher_submits_to_slurm(slurm_cluster, tmp_path):
    data = write_hh_file(tmp_path / 'pairs.jsonl')
    run_dir = str(tmp_path / 'run')
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-u', 'train.py', '-m', 'hydra/launcher=slurm', *TINY, 'loss=sft',
                           f'datasets=[{data}]', 'exp_name=submitit', f'local_run_dir={run_dir}', 'n_examples=4',
                           'hydra.launcher.cpus_per_task=2', 'hydra.launcher.mem_gb=8', 'hydra.launcher.timeout_min=15'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    job_logs = [os.path.join(d, f) for d, _, files in os.walk(f'{run_dir}_sweep') for f in files if f.endswith('_log.out')]
    assert len(job_logs) == 1, job_logs
    with open(job_logs[0]) as f:
        assert f'run directory: {run_dir}' in f.read()
    assert [m['step'] for m in read_metrics(run_dir)] == [4]
