"""FSDPTrainer and TensorParallelTrainer as users launch them (torchrun, 2 CPU processes, gloo) against
BasicTrainer on the same data and seed: the same losses, metrics and updated weights within float32
tolerance, with each rank's batch split into 2 accumulation steps (2 ranks x 2 microbatches of 1 = one
batch of 4); sharded checkpoints load back; `python train.py` spawns the workers itself, with mixed precision."""
import contextlib
import getpass
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import CACHE, ROOT, TORCHRUN, failure_report, small_tmpfs, torchrun_worker, write_hh_file

COMMON = ['model=tiny', f'local_dirs=[{CACHE}]', 'batch_size=4', 'eval_batch_size=4', 'max_length=64',
          'max_prompt_length=32', 'eval_fraction=0.25', 'n_eval_examples=8', 'n_eval_model_samples=4',
          'optimizer=SGD', 'lr=1e-2', 'warmup_steps=0', 'n_examples=8', 'eval_every=8',
          'minimum_log_interval_secs=0', 'wandb.enabled=false']


def run(launcher, args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run([*launcher, 'train.py', *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, failure_report(proc.stdout + proc.stderr)
    return proc.stdout + proc.stderr


def read_metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def read_samples(run_dir):
    with open(os.path.join(run_dir, 'samples.jsonl')) as f:
        return [json.loads(line) for line in f]


def final_policy(run_dir):
    return torch.load(os.path.join(run_dir, 'LATEST', 'policy.pt'), map_location='cpu', weights_only=True)['state']


def assert_same_run(expected_dir, got_dir, weight_atol=1e-6):
    expected, got = read_metrics(expected_dir), read_metrics(got_dir)
    assert [(m['split'], m['step']) for m in got] == [(m['split'], m['step']) for m in expected]
    for want, have in zip(expected, got):
        want.pop('examples_per_second', None), have.pop('examples_per_second', None)
        assert set(have) == set(want)
        for key in set(want) - {'split'}:
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (want['split'], want['step'], key)
    want_state, have_state = final_policy(expected_dir), final_policy(got_dir)
    assert set(have_state) == set(want_state)
    for key in want_state:
        torch.testing.assert_close(have_state[key], want_state[key], rtol=1e-4, atol=weight_atol)


@pytest.mark.parametrize('loss', ['sft', 'tdpo'])
def test_fsdp_and_tensor_parallel_equal_basic_trainer(tmp_path, loss):
    args = [*COMMON, f'loss={loss}', f'datasets=[{write_hh_file(tmp_path / "pairs.jsonl")}]']
    basic = str(tmp_path / 'basic')
    run([sys.executable], [*args, 'exp_name=basic', f'local_run_dir={basic}',
                           *([] if loss == 'tdpo' else ['sample_during_eval=false'])])
    metrics = read_metrics(basic)
    assert [m['step'] for m in metrics if m['split'] == 'train'] == [4, 8]
    assert [m['split'] for m in metrics] == ['eval', 'train', 'train', 'eval']

    # FSDP: no local_run_dir given, so each rank resolves its own timestamp; all must use rank 0's
    exp_name = f'fsdp_{loss}_{os.getpid()}'
    fsdp_args = [*args, 'trainer=FSDPTrainer', 'gradient_accumulation_steps=2', f'exp_name={exp_name}']
    if loss == 'tdpo':  # sampling (all ranks generate together) and activation checkpointing change no number
        fsdp_args += ['activation_checkpointing=true']
    else:
        fsdp_args += ['sample_during_eval=false']
    run(TORCHRUN, fsdp_args)
    run_dirs = glob.glob(os.path.join(CACHE, getpass.getuser(), f'{exp_name}_*'))
    assert len(run_dirs) == 1, run_dirs
    fsdp = str(tmp_path / 'fsdp')
    shutil.move(run_dirs[0], fsdp)
    assert_same_run(basic, fsdp)
    assert {'policy.pt', 'scheduler.pt', 'sharded'} <= set(os.listdir(os.path.join(fsdp, 'LATEST')))
    if loss == 'tdpo':
        # each evaluation logs n_eval_model_samples (4) samples, of the prompts BasicTrainer samples, in its order:
        # rank 0 sampled the first two, rank 1 the last two
        expected = [(s['step'], s['prompt']) for s in read_samples(basic)]
        assert [step for step, _ in expected] == [0] * 4 + [8] * 4 and len({prompt for _, prompt in expected}) == 4
        samples = read_samples(fsdp)
        assert [(s['step'], s['prompt']) for s in samples] == expected
        assert all(isinstance(s['policy'], str) and isinstance(s['reference'], str) for s in samples)

    tp = str(tmp_path / 'tp')
    run(TORCHRUN, [*args, 'trainer=TensorParallelTrainer', 'gradient_accumulation_steps=2', 'exp_name=tp',
                   f'local_run_dir={tp}', *([] if loss == 'tdpo' else ['sample_during_eval=false'])])
    assert_same_run(basic, tp)
    if loss == 'tdpo':  # tensor-parallel ranks sample the whole batch together: the same prompts
        assert [(s['step'], s['prompt']) for s in read_samples(tp)] == expected

    if loss == 'tdpo':
        # the HF export of the sharded policy holds the full final weights
        from transformers import AutoModelForCausalLM
        exported = AutoModelForCausalLM.from_pretrained(os.path.join(fsdp, 'hf')).state_dict()
        for key, value in final_policy(fsdp).items():
            torch.testing.assert_close(exported[key], value)
    else:
        # `python train.py` starts one process per local GPU itself (one on CPU); bfloat16 compute gives
        # nearly the same first loss
        spawned = str(tmp_path / 'spawned')
        out = run([sys.executable], [*args, 'trainer=FSDPTrainer', 'model.fsdp_policy_mp=bfloat16', 'exp_name=spawned',
                                     f'local_run_dir={spawned}', 'n_eval_examples=0'])
        assert 'FSDPTrainer: starting one process per local GPU (1)' in out
        assert read_metrics(spawned)[0]['loss/train'] == pytest.approx(metrics[1]['loss/train'], rel=2e-2)


def test_fsdp_lora_equals_basic_trainer_lora(tmp_path):
    """LoRA under FSDP2 (frozen base weights and adapters sharded together; the reference is the policy with
    adapters off, also when all ranks sample together): BasicTrainer's losses, metrics and adapter;
    checkpoints hold only the adapter; the merged hf/ exports agree."""
    from transformers import AutoModelForCausalLM
    args = [*(a for a in COMMON if not a.startswith(('optimizer=', 'lr='))), 'optimizer=AdamW', 'lr=1e-2', 'loss=tdpo',
            'lora.r=4', 'lora.alpha=8', f'datasets=[{write_hh_file(tmp_path / "pairs.jsonl")}]']
    basic, fsdp = str(tmp_path / 'basic'), str(tmp_path / 'fsdp')
    run([sys.executable], [*args, 'exp_name=basic', f'local_run_dir={basic}'])
    run(TORCHRUN, [*args, 'trainer=FSDPTrainer', 'gradient_accumulation_steps=2', 'exp_name=fsdp', f'local_run_dir={fsdp}'])
    # AdamW moves each adapter weight by about lr whatever its gradient's size, so on an element whose gradient
    # is near 0 float32 rounding shows more than on full weights (measured: 1.8e-6 on one of 256 elements)
    assert_same_run(basic, fsdp, weight_atol=1e-5)
    adapter = final_policy(fsdp)
    assert len(adapter) == 28 and all('.lora_' in k for k in adapter)
    assert read_metrics(fsdp)[-1]['kl_eval/chosen'] > 1e-3, 'the adapter should have moved the policy'
    for run_dir in (basic, fsdp):
        assert os.path.exists(os.path.join(run_dir, 'adapter', 'adapter_config.json'))
    ids = torch.arange(3, 23).reshape(2, 10)
    with torch.no_grad():
        want, got = (AutoModelForCausalLM.from_pretrained(os.path.join(d, 'hf'))(ids).logits for d in (basic, fsdp))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sharded_checkpoints_load_back(tmp_path):
    """Save after one AdamW update, load into fresh FSDP and TP trainers: same weights, optimizer state, step."""
    write_hh_file(tmp_path / 'pairs.jsonl')
    proc = torchrun_worker('dist_checkpoint_worker.py', tmp_path, timeout=600)
    assert proc.returncode == 0, failure_report(proc.stdout + proc.stderr)
    assert proc.stdout.count('checkpoint ok') == 6, proc.stdout  # (FSDP, TP, FSDP with LoRA) x 2 ranks


def test_sharded_checkpoint_on_a_full_disk_stops_every_rank_with_one_line(tmp_path):
    """FSDPTrainer's checkpoints are written by every rank (torch.distributed.checkpoint) besides rank 0's
    policy.pt; on a real 64 MB disk step-4 (51 MB: policy.pt and the shards) fits and step-8 does not: every
    rank stops, rank 0 says so in one line, the partial directory is gone and step-4 still verifies."""
    import checkpoints
    with small_tmpfs(tmp_path / 'disk', '64m') as disk:
        run_dir = os.path.join(disk, 'run')
        args = [*COMMON, 'loss=sft', f'datasets=[{write_hh_file(tmp_path / "pairs.jsonl")}]', 'trainer=FSDPTrainer',
                'exp_name=full', f'local_run_dir={run_dir}', 'n_eval_examples=0', 'n_examples=12', 'checkpoint_every=4']
        proc = subprocess.run([*TORCHRUN, 'train.py', *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'),
                              capture_output=True, text=True, timeout=600)
        out = proc.stdout + proc.stderr
        assert proc.returncode != 0
        lines = [line[line.index('disk full'):] for line in out.splitlines() if 'disk full' in line]
        assert len(lines) == 1 and lines[0].startswith(f'disk full while writing checkpoint {run_dir}/step-8 ('), out[-4000:]
        assert 'checkpoints.py", line' not in out and 'trainers.py", line' not in out, out[-4000:]
        assert sorted(d for d in os.listdir(run_dir) if d.startswith('step-')) == ['step-4']
        assert checkpoints.verify(os.path.join(run_dir, 'step-4')) == 4


@pytest.mark.parametrize('mode', ['abort', 'raise'])
def test_a_native_crash_is_launched_once_more_and_an_assertion_is_not(tmp_path, mode):
    """helpers.torchrun_worker: a rank ended by SIGABRT (a native crash, once seen in CI in gloo) is launched
    once more in a fresh directory, with a warning that names the signal; an assertion fails at once."""
    (tmp_path / 'mode').write_text(mode)
    with pytest.warns(UserWarning, match='ended by signal 6') if mode == 'abort' else contextlib.nullcontext():
        proc = torchrun_worker('crash_worker.py', tmp_path, timeout=120)
    out = proc.stdout + proc.stderr
    if mode == 'abort':
        assert proc.returncode == 0 and proc.stdout.count('crash worker ok') == 2, failure_report(out)
        assert (tmp_path / 'again' / 'mode').read_text() == 'abort'
    else:
        assert proc.returncode == 1 and 'planted assertion' in out and not (tmp_path / 'again').exists(), out[-3000:]
