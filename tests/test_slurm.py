"""A real (single-node) Slurm cluster runs the project's sbatch scripts and Hydra's submitit launcher:
a 2-process TDPO job on CPU through slurm/multi_node.sbatch (srun + torchrun rendezvous from the Slurm
environment), an SFT job through slurm/single_node.sbatch, one `train.py -m hydra/launcher=slurm` run, and a
preemption signal to each script's batch shell (checkpoint, exit 75, requeue, resume).
`bash slurm/cluster.sh start` starts the cluster (.ci/run does it first); this module does it if needed.
Without Slurm (fake squeue and scontrol): who requeues a job after a preemption checkpoint, train.py or the batch
script, and when."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import distributed
import train
from helpers import CACHE, ROOT, write_hh_file

TINY = ['model=tiny', f'local_dirs=[{CACHE}]', 'batch_size=4', 'eval_batch_size=4', 'max_length=64',
        'max_prompt_length=32', 'n_examples=8', 'n_eval_examples=0', 'optimizer=SGD', 'lr=1e-2', 'warmup_steps=0',
        'minimum_log_interval_secs=0', 'wandb.enabled=false']
# CPU processes instead of GPUs, on this machine's 2 cores
SBATCH_CPU = ['--nodes=1', '--gpus-per-node=0', '--cpus-per-task=2', '--mem=8G', '--time=15']
# how long a job may wait in the queue (behind other jobs on this one node) and then run (here 20 to 100 s; the
# preemption test's jobs include a requeue)
START_LIMIT, RUN_LIMIT = 1200, 600


def job_env(**variables):
    """sbatch --export: CPU processes, the test's python, and a rendezvous port free now (multi_node.sbatch), so
    that a process left on a fixed port cannot hold the job up."""
    variables = dict(NPROC_PER_NODE=2, PYTHON=sys.executable, OMP_NUM_THREADS=1, HF_HUB_OFFLINE=1,
                     RDZV_PORT=distributed.get_open_port(), **variables)
    return '--export=ALL,' + ','.join(f'{k}={v}' for k, v in variables.items())


@pytest.fixture(scope='module')
def slurm_cluster():
    if shutil.which('sbatch') is None or subprocess.run(['sinfo'], capture_output=True).returncode != 0:
        subprocess.run(['bash', os.path.join(ROOT, 'slurm', 'cluster.sh'), 'start'], check=True, timeout=900)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def submit(script, args, output, options, name):
    """Submit slurm/<script> with train.py's overrides `args`; its job id."""
    proc = subprocess.run(['sbatch', '--parsable', f'--job-name={name}', f'--output={output}', *options,
                           os.path.join('slurm', script), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().split(';')[0]


def command_output(command):
    proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return f'$ {" ".join(command)}\n{proc.stdout}{proc.stderr}'


def job_report(job_id, output):
    """What there is to see of a job that failed or did not end: the tail of its output, Slurm's view of it (state,
    reason, node) and its steps, and the queue it is in."""
    log = output.read_text()[-5000:] if output.exists() else '(no output file)'
    return '\n'.join([f'--- output of job {job_id} ({output}), last 5000 characters:', log,
                      command_output(['scontrol', 'show', 'job', job_id]),
                      command_output(['sacct', '-P', '-D', '-j', job_id, '-o',
                                      'JobID,JobName,State,ExitCode,Reason,Submit,Start,Elapsed']),
                      command_output(['squeue', '-o', '%i %j %u %T %M %l %C %R'])])


def wait_for_jobs(jobs, run_limit=RUN_LIMIT, start_limit=START_LIMIT, poll=lambda: None):
    """Wait until no job of `jobs` ({job id: output file}) is queued or running, calling `poll` about twice a second.
    A job that waits to start longer than start_limit seconds, or runs (requeued runs included) longer than
    run_limit after its first start, fails the test with every unfinished job's report, and is cancelled."""
    submitted, started, states = time.time(), {}, dict.fromkeys(jobs, 'PENDING')
    while True:
        poll()
        queue = subprocess.run(['squeue', '-h', '-o', '%i %T'], capture_output=True, text=True)
        if queue.returncode == 0:  # else (slurmctld busy) as at the last look
            states = {job_id: state for job_id, state in map(str.split, queue.stdout.splitlines()) if job_id in jobs}
        if not states:
            return
        now = time.time()
        for job_id, state in states.items():
            if state != 'PENDING':
                started.setdefault(job_id, now)
        late = [f'job {job_id} waited over {start_limit} s to start' for job_id in states
                if job_id not in started and now - submitted > start_limit]
        late += [f'job {job_id} ran over {run_limit} s' for job_id in states
                 if job_id in started and now - started[job_id] > run_limit]
        if late:
            reports = [job_report(job_id, jobs[job_id]) for job_id in states]
            subprocess.run(['scancel', *states], capture_output=True)
            pytest.fail('; '.join(late) + ' (cancelled)\n' + '\n'.join(reports), pytrace=False)
        time.sleep(0.5)


def sbatch(script, args, tmp_path):
    """Run slurm/<script> as a job on CPU, to its end; its output."""
    output = tmp_path / f'{script}.out'
    job_id = submit(script, args, output, [*SBATCH_CPU, job_env()], f'test_{os.getpid()}_{script}')
    try:
        wait_for_jobs({job_id: output})
    finally:
        subprocess.run(['scancel', job_id], capture_output=True)
    runs = [run[1:] for run in job_history(job_id) if run[0] == job_id]
    assert runs == [['COMPLETED', '0:0']], job_report(job_id, output)
    return output.read_text()


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


def job_history(job_id):
    """[JobID, State, ExitCode] of each run of a job and of its steps, from Slurm's accounting (which can lag
    squeue a moment)."""
    for _ in range(60):
        history = [line.split('|') for line in subprocess.run(
            ['sacct', '-n', '-P', '-D', '-j', job_id, '-o', 'JobID,State,ExitCode'], capture_output=True,
            text=True).stdout.splitlines()]
        runs = [state for job, state, _ in history if job == job_id]
        if runs and runs[-1] not in ('PENDING', 'RUNNING', 'REQUEUED', 'COMPLETING'):
            return history
        time.sleep(0.5)
    return history


def test_signal_to_batch_shell_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    """What `#SBATCH --signal=B:TERM@120` (or B:USR1) does before the time limit, done now with `scancel --batch`:
    the signal reaches only the batch shell, which passes it on to the training processes (multi_node.sbatch: a
    SIGTERM to the job's steps on every node; single_node.sbatch: a SIGUSR1 to torchrun's processes). They
    checkpoint step-N and exit 75; only then the batch script requeues the job and exits 75, and the requeued job
    resumes from step-N and completes, logging each step once. Both jobs run at once (one CPU each) to keep the
    test short."""
    data = write_hh_file(tmp_path / 'pairs.jsonl')
    options = ['--nodes=1', '--gpus-per-node=0', '--cpus-per-task=1', '--mem=6G', '--time=20', job_env()]
    jobs = {}  # script -> (job id, signal, run dir, output file)
    try:
        for script, signal_name in (('multi_node.sbatch', 'TERM'), ('single_node.sbatch', 'USR1')):
            run_dir, output = tmp_path / script.split('.')[0], tmp_path / f'{script}.out'
            job_id = submit(script, [*TINY, 'loss=tdpo', f'datasets=[{data}]', 'exp_name=preempt',
                                     f'local_run_dir={run_dir}', 'n_examples=32',
                                     'stats_impl=naive'],  # naive: no torch.compile, so each start is shorter
                            output, options, f'test_{os.getpid()}_preempt')
            jobs[script] = (job_id, signal_name, run_dir, output)
        signalled = set()

        def signal_running_jobs():  # once training runs (metrics.jsonl): the test is of a checkpoint, then 75
            for script, (job_id, signal_name, run_dir, _) in jobs.items():
                if script not in signalled and (run_dir / 'metrics.jsonl').exists():
                    subprocess.run(['scancel', f'--signal={signal_name}', '--batch', job_id], check=True)
                    signalled.add(script)

        wait_for_jobs({job_id: output for job_id, _, _, output in jobs.values()}, run_limit=900,
                      poll=signal_running_jobs)
    finally:
        for job_id, *_ in jobs.values():
            subprocess.run(['scancel', job_id], capture_output=True)

    for script, (job_id, signal_name, run_dir, output) in jobs.items():
        log = output.read_text()
        stopped = re.search(rf'stopped by signal (\d+) after (\d+) examples; checkpoint in '
                            rf'{re.escape(str(run_dir))}/step-(\d+)', log)
        assert stopped and int(stopped[1]) == getattr(signal, f'SIG{signal_name}'), job_report(job_id, output)
        step = int(stopped[2])
        assert 4 <= step < 32 and int(stopped[3]) == step
        # both training processes exited 75 (torchrun's summary), then the batch script requeued the job
        assert len(re.findall(r'exitcode\s*: 75 ', log)) == 2, job_report(job_id, output)
        requeued = log.index(f'batch script: the training processes checkpointed and exited 75; requeueing Slurm '
                             f'job {job_id} and exiting 75')
        assert stopped.start() < requeued < log.index(f'resumed from {run_dir}/step-{step} after {step} examples')
        assert not re.search(r'^requeueing Slurm job', log, re.MULTILINE), 'train.py requeued the job itself'
        assert log.rstrip().endswith(f'run directory: {run_dir}'), log[-3000:]
        # the requeued run continued the interrupted one: every update logged once, in order
        assert [m['step'] for m in read_metrics(run_dir) if m['split'] == 'train'] == list(range(4, 36, 4))
        assert os.path.exists(os.path.join(run_dir, 'LATEST', 'policy.pt'))
        # accounting: the job was requeued (the job's own exit code of a requeued run is 0:0), then completed; the
        # first run's batch script (and multi_node's training step: srun) exited 75. A batch shell killed by the
        # signal (0:15) would have ended the job at once, leaving the training processes only Slurm's KillWait.
        history = job_history(job_id)
        assert [run[1:] for run in history if run[0] == job_id] == [['REQUEUED', '0:0'], ['COMPLETED', '0:0']], history
        steps = ['batch', '0'] if script == 'multi_node.sbatch' else ['batch']
        for step in steps:
            assert next(run[1:] for run in history if run[0] == f'{job_id}.{step}') == ['FAILED', '75:0'], history
        assert log.index(f'batch script: received SIG{signal_name}; passing it on') < stopped.start()


def fake_slurm_job(tmp_path, state='RUNNING', **variables):
    """The environment of a Slurm job on one node, localhost, without Slurm: SLURM_JOB_ID and the rest, a fake
    squeue that says the job is in `state`, a fake scontrol that names the node (`show hostnames`) or appends its
    arguments to tmp_path/scontrol.calls, and a fake srun that writes its arguments to tmp_path/srun.calls."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for command, script in (
            ('squeue', f'echo {state}'),
            ('scontrol', f'if [ "$1" = show ]; then echo localhost; else echo "$@" >> {tmp_path / "scontrol.calls"}; fi'),
            ('srun', f'echo "$@" > {tmp_path / "srun.calls"}')):
        (bin_dir / command).write_text(f'#!/bin/sh\n{script}\n')
        (bin_dir / command).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ('TDPO_BATCH_SCRIPT_REQUEUES', 'RDZV_PORT')}
    env.update(PATH=f'{bin_dir}:{env["PATH"]}', SLURM_JOB_ID='4242', SLURM_JOB_NODELIST='localhost',
               SLURM_JOB_NUM_NODES='1', SLURM_SUBMIT_DIR=ROOT, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    return dict(env, **variables)


def scontrol_calls(tmp_path):
    calls = tmp_path / 'scontrol.calls'
    return calls.read_text().splitlines() if calls.exists() else []


@pytest.mark.parametrize('when', ['training', 'starting'])
def test_train_py_requeues_its_job_when_it_is_the_jobs_own_process(tmp_path, when):
    """SIGUSR1 to `python train.py` started directly by a batch script (a Slurm job without Slurm: fake squeue and
    scontrol): it requeues the job itself and exits 75, after a checkpoint once training runs; while the run
    starts (the models load), without one (the signal used to kill it: a failed job, not requeued)."""
    data = write_hh_file(tmp_path / 'pairs.jsonl')
    run_dir = tmp_path / 'run'
    proc = subprocess.Popen([sys.executable, '-u', 'train.py', *TINY, 'loss=tdpo', f'datasets=[{data}]', 'exp_name=requeue',
                             f'local_run_dir={run_dir}', 'n_examples=4000', 'stats_impl=naive'], cwd=ROOT,
                            env=fake_slurm_job(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        if when == 'starting':  # the run directory is ready; the models, the data and the trainer are not
            head = ''
            while not head.endswith(f'Writing to {socket.gethostname()}:{run_dir}\n'):
                line = proc.stdout.readline()
                assert line, head[-4000:]
                head += line
        else:
            while not (run_dir / 'metrics.jsonl').exists():  # after the first update
                assert proc.poll() is None, proc.communicate()[0][-4000:]
                time.sleep(0.1)
        proc.send_signal(signal.SIGUSR1)
        out = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert proc.returncode == 75, out[-4000:]
    if when == 'starting':
        stopped = re.search(r'stopped by signal 10 before the first update \(after 0 examples\): no new checkpoint', out)
        assert not list(run_dir.glob('step-*')) and not (run_dir / 'metrics.jsonl').exists(), 'it trained'
    else:
        stopped = re.search(rf'stopped by signal 10 after \d+ examples; checkpoint in {re.escape(str(run_dir))}/step-\d+',
                            out)
    assert stopped and out.index('requeueing Slurm job 4242') > stopped.start(), out[-4000:]
    assert scontrol_calls(tmp_path) == ['requeue 4242']


@pytest.mark.parametrize('variables, state, requeued, says', [
    ({}, 'RUNNING', True, 'requeueing Slurm job 4242'),
    ({'TDPO_BATCH_SCRIPT_REQUEUES': '1'}, 'RUNNING', False, ''),
    ({}, 'COMPLETING', False, 'not requeueing Slurm job 4242: Slurm is ending it (COMPLETING)'),
    ({'SLURM_JOB_ID': ''}, 'RUNNING', False, '')], ids=['job_process', 'under_batch_script', 'cancelled', 'no_slurm'])
def test_train_py_requeues_only_when_no_batch_script_will_and_slurm_is_not_ending_the_job(
        tmp_path, monkeypatch, capsys, variables, state, requeued, says):
    """The decision train.py takes after a preemption checkpoint: requeue the job itself only as the job's own
    process (not started by slurm/*.sbatch, which requeue it once the training processes have ended) and only
    while the job runs (after `scancel JOB` a requeue would undo the cancel)."""
    for key, value in fake_slurm_job(tmp_path, state, **variables).items():
        monkeypatch.setenv(key, value)
    train.requeue_slurm_job()
    assert scontrol_calls(tmp_path) == (['requeue 4242'] if requeued else [])
    assert capsys.readouterr().out.strip() == says


# stands in for `$PYTHON slurm/torchrun.py ...`: one training process (its child), which runs a few seconds and exits
# $EXIT_CODE, or exits $EXIT_ON_SIGNAL once it gets SIGTERM or SIGUSR1; exits with that process's exit code
FAKE_TORCHRUN = """#!/bin/bash
bash -c 'trap "exit $EXIT_ON_SIGNAL" TERM USR1; touch "$STARTED"; for _ in $(seq 30); do sleep 0.1; done; exit $EXIT_CODE' &
wait $!
"""


@pytest.mark.parametrize('state, signalled, exit_on_signal, exit_code', [
    ('RUNNING', True, 75, 0), ('RUNNING', True, 0, 0), ('RUNNING', False, 0, 3), ('COMPLETING', True, 75, 0)],
    ids=['checkpointed', 'finished_as_the_signal_came', 'failed', 'cancelled'])
def test_batch_script_requeues_only_after_the_training_processes_exit_75(tmp_path, state, signalled, exit_on_signal,
                                                                         exit_code):
    """single_node.sbatch's logic (slurm/run_training.sh) run by bash without Slurm: a SIGUSR1 to the batch shell
    reaches the training process; exit 75 (a checkpoint) makes the script requeue the job, unless Slurm is ending it
    (scancel), and exit 75; exit 0 (training finished, even as the signal came) and a failure (exit 3) end the job
    with that code, unrequeued."""
    fake_torchrun = tmp_path / 'fake_torchrun'
    fake_torchrun.write_text(FAKE_TORCHRUN)
    fake_torchrun.chmod(0o755)
    started = tmp_path / 'started'
    env = fake_slurm_job(tmp_path, state, PYTHON=str(fake_torchrun), NPROC_PER_NODE='2', STARTED=str(started),
                         EXIT_ON_SIGNAL=str(exit_on_signal), EXIT_CODE=str(exit_code))
    proc = subprocess.Popen(['bash', 'slurm/single_node.sbatch', 'model=tiny'], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not started.exists() and time.time() < deadline:
            time.sleep(0.05)
        if signalled:
            proc.send_signal(signal.SIGUSR1)
        out = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    expected = exit_on_signal if signalled else exit_code
    assert proc.returncode == expected, out
    assert ('batch script: received SIGUSR1; passing it on to the training processes' in out) == signalled
    if expected == 75 and state == 'RUNNING':
        assert scontrol_calls(tmp_path) == ['requeue 4242']
        assert 'batch script: the training processes checkpointed and exited 75; requeueing Slurm job 4242 and ' \
               'exiting 75' in out
    elif expected == 75:
        assert scontrol_calls(tmp_path) == []
        assert 'batch script: the training processes checkpointed and exited 75; not requeueing Slurm job 4242, ' \
               'which Slurm is ending (COMPLETING); exiting 75' in out
    else:
        assert scontrol_calls(tmp_path) == [] and 'requeueing Slurm job' not in out
        assert ('batch script: the training processes failed (exit code 3); not requeueing' in out) == (expected == 3)


def listening_socket(port):
    """A socket listening on `port` that never answers (as a stuck process would hold a port), or None if the port
    is taken."""
    sock = socket.socket()
    try:
        sock.bind(('', port))
    except OSError:
        sock.close()
        return None
    sock.listen()
    return sock


def held_port():
    """(a socket listening on a port of 29500-30498, that port), the next port being free."""
    for port in range(29500, 30499):
        held = listening_socket(port)
        if held is None:
            continue
        following = listening_socket(port + 1)
        if following is not None:
            following.close()
            return held, port
        held.close()
    pytest.fail('no two free ports in 29500-30499')


@pytest.mark.parametrize('case', ['default', 'default_taken', 'given_taken'])
def test_multi_node_rendezvous_port_is_free_and_differs_between_jobs(tmp_path, case):
    """multi_node.sbatch's rendezvous port (a Slurm job without Slurm: fake scontrol and srun): 29500 + the job id
    modulo 1000, the next port if that one is taken, and a given RDZV_PORT that is taken stops the job with one line
    instead of starting torchrun, whose c10d rendezvous would join the listener and wait (it waited over 3 minutes,
    until killed, for a listener that never answered)."""
    held, port = held_port()
    if case == 'default':
        held.close()
    variables = {'SLURM_JOB_ID': str(7000 + port - 29500), 'NPROC_PER_NODE': '2', 'PYTHON': sys.executable}
    if case == 'given_taken':
        variables['RDZV_PORT'] = str(port)
    try:
        proc = subprocess.run(['bash', 'slurm/multi_node.sbatch', 'model=tiny'], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, env=fake_slurm_job(tmp_path, **variables))
    finally:
        held.close()
    out = proc.stdout + proc.stderr
    srun = tmp_path / 'srun.calls'
    if case == 'given_taken':
        assert proc.returncode == 1 and not srun.exists(), out
        assert out.strip() == f'batch script: no free rendezvous port on localhost (tried {port} to {port}): set ' \
                              f'RDZV_PORT', out
    else:
        expected = port if case == 'default' else port + 1
        assert proc.returncode == 0, out
        assert f'batch script: rendezvous at localhost:{expected}' in out
        assert f' --rdzv-id {variables["SLURM_JOB_ID"]} --rdzv-backend c10d --rdzv-endpoint localhost:{expected} ' \
               in srun.read_text()
