"""Shared test fixtures: a synthetic HH-format data file, composed configs, a BasicTrainer on model=tiny, and a
planted checkpoint that would create a file if it were unpickled."""
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

import train  # train.check_config and train.build_models: as train.py checks and builds
import trainers
from run_config import compose_config  # noqa: F401 (the tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, '.cache')  # the dequantized model and tokenizer are cached here once
HH_SAMPLE = os.path.join(ROOT, '..', 'shared', 'data', 'hh-rlhf-harmless-sample', 'rows.jsonl.gz')
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2']

# what a rank that died in native code leaves in the output: libstdc++'s terminate, glibc's heap checks,
# faulthandler's stack (PYTHONFAULTHANDLER=1), and torchrun's summary naming the signal
_NATIVE_CRASH_LINE = re.compile(r'terminate called|what\(\):|Fatal Python error|corrupted|double free|'
                                r'^(Current )?[Tt]hread 0x|Signal \d+ \(SIG\w+\) received|exitcode  : -')
_FAULTHANDLER_HEADER = re.compile(r'^(Fatal Python error|(Current )?[Tt]hread 0x)')


def _root_cause_signal(out: str):
    """The signal torchrun names as the root cause ('exitcode : -6' under 'Root Cause'), or None: a rank that
    raised a Python exception (an assertion included) exits 1, never by a signal."""
    match = re.search(r'Root Cause \(first observed failure\):.*?exitcode\s*:\s*(-\d+)', out, re.S)
    return int(match.group(1)) if match else None


def failure_report(out: str, tail: int = 6000) -> str:
    """What a failed launch printed, for an assertion message: the lines that say how a rank died natively
    (they come first and a tail alone loses them, as in one CI run), then the tail."""
    crash, in_stack = [], False
    for line in out.splitlines():  # faulthandler's frames follow its header; a Python traceback's are not taken
        in_stack = bool(_FAULTHANDLER_HEADER.match(line)) or (in_stack and line.startswith('  File "'))
        if _NATIVE_CRASH_LINE.search(line) or in_stack:
            crash.append(line)
    crash = crash[:60]
    return ('\n'.join(crash) + '\n---- tail ----\n' if crash else '') + out[-tail:]


def torchrun_worker(script: str, work_dir, timeout: float):
    """`torchrun --standalone --nproc-per-node 2 tests/SCRIPT WORK_DIR` from the repository root, one thread per
    rank, faulthandler on. A launch whose first failing rank was ended by a signal (a native crash in gloo or the
    allocator; a rank whose code under test raises, an assertion included, exits 1) runs once more in a fresh
    WORK_DIR/again holding WORK_DIR's files, with a warning that carries the crash's lines; a second crash, or
    any failure by exception, is returned as it is."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONFAULTHANDLER='1')
    launch = lambda d: subprocess.run([*TORCHRUN, os.path.join(ROOT, 'tests', script), str(d)], cwd=ROOT, env=env,
                                      capture_output=True, text=True, timeout=timeout)
    proc = launch(work_dir)
    out = proc.stdout + proc.stderr
    signal = _root_cause_signal(out) if proc.returncode != 0 else None
    if signal is not None:
        warnings.warn(f'{script}: a rank was ended by signal {-signal}; launched once more:\n'
                      f'{failure_report(out, tail=2000)}')
        again = os.path.join(work_dir, 'again')
        os.makedirs(again)
        for name in os.listdir(work_dir):
            if os.path.isfile(os.path.join(work_dir, name)):
                shutil.copy(os.path.join(work_dir, name), again)
        proc = launch(again)
    return proc


# SeqKL of a policy equal to its reference, in the same precision: zero up to the rounding of the statistics'
# float32 reductions (compiled kernels reduce z and r in different orders). Measured: <= 3e-6 on the machine these
# tests were written on, 1.08e-5 for bfloat16 on a later one (also at the commit before any change there); a
# reference in another precision gives > 1e-4 (tests/test_trainer.py), so 3e-5 still tells the two apart.
EQUAL_MODELS_KL_BOUND = 3e-5


def write_hh_file(path, n=48):
    """n HH-format rows with distinct prompts; chosen answers are longer and polite."""
    with open(path, 'w') as f:
        for i in range(n):
            prompt = f'\n\nHuman: Tell me something about the number {i}.\n\nAssistant:'
            f.write(json.dumps({'chosen': prompt + f' Gladly! {i} is a fine number, {i % 7} more than a multiple of 7.',
                                'rejected': prompt + ' No.'}) + '\n')
    return str(path)


def make_trainer(tmp_path, loss='tdpo', perturb=True, **overrides):
    os.makedirs(tmp_path, exist_ok=True)
    settings = {'model': 'tiny', 'loss': loss, 'exp_name': 't', 'datasets': f'[{write_hh_file(tmp_path / "pairs.jsonl")}]',
                'local_dirs': f'[{CACHE}]', 'local_run_dir': str(tmp_path / 'run'), 'batch_size': 4,
                'max_length': 64, 'max_prompt_length': 32, 'n_eval_examples': 0, 'do_first_eval': False,
                'wandb.enabled': False, 'optimizer': 'SGD', 'lr': 1.0, 'warmup_steps': 0, 'max_grad_norm': 1e9,
                'n_examples': 4, 'minimum_log_interval_secs': 0}
    if loss in ('dpo', 'ipo'):
        settings['loss.beta'] = 0.1
    settings.update(overrides)
    config = compose_config(f'{k}={v}' for k, v in settings.items())
    train.check_config(config)
    os.makedirs(config.local_run_dir, exist_ok=True)
    policy, reference_model = train.build_models(config)
    trainer = trainers.BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference_model)
    if not perturb:  # policy == reference, as a run starts
        return trainer
    with torch.no_grad():  # move the policy away from the reference, reproducibly
        g = torch.Generator().manual_seed(0)
        for p in trainer.policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return trainer


class Payload:
    """Unpickling this creates the file `marker` (what a planted checkpoint could do)."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f'open({self.marker!r}, "w").close()',))


def plant(path, marker):
    """A reference-format checkpoint file that would create `marker` when unpickled."""
    torch.save({'step_idx': 0, 'state': {'w': Payload(marker)}, 'metrics': {}}, path)


@contextlib.contextmanager
def small_tmpfs(path, size: str):
    """A real small file system of `size` (e.g. '40m') mounted at `path`, to fill up; the test is skipped,
    saying why, where mounting is not permitted (tests/test_checkpoints.py injects the fault instead)."""
    os.makedirs(path)
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}); '
                    f'tests/test_checkpoints.py::test_disk_full_by_fault_injection covers a full disk in-process')
    try:
        yield str(path)
    finally:
        subprocess.run(['umount', '-l', str(path)], check=False)
