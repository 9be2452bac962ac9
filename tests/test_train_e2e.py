"""`python train.py` end to end on model=tiny, as a user runs it: SFT, then TDPO from the SFT
archive; checkpoints in the reference's format, the HF export, metrics.jsonl, offline wandb, errors."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import CACHE, EQUAL_MODELS_KL_BOUND, ROOT, write_hh_file

SMALL = ['model=tiny', f'local_dirs=[{CACHE}]', 'batch_size=4', 'eval_batch_size=4', 'max_length=64',
         'max_prompt_length=32', 'eval_fraction=0.25', 'n_eval_examples=8', 'n_eval_model_samples=2', 'lr=1e-3']


def run_train(args, home, expect_ok=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    env['HOME'] = str(home)  # no ~/.netrc: wandb must find no credentials and go offline by itself
    proc = subprocess.run([sys.executable, '-u', 'train.py', *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if expect_ok:
        assert proc.returncode == 0, output[-4000:]
    return proc.returncode, output


def read_metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def load_checkpoint(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_sft_then_tdpo_from_archive(tmp_path):
    data = write_hh_file(tmp_path / 'pairs.jsonl')
    sft_dir = str(tmp_path / 'sft')
    _, out = run_train([*SMALL, 'loss=sft', f'datasets=[{data}]', 'exp_name=e2e_sft', f'local_run_dir={sft_dir}',
                        'n_examples=16', 'eval_every=8'], tmp_path)
    assert 'logging offline' in out and f'run directory: {sft_dir}' in out
    assert any(name.startswith('offline-run-') for name in os.listdir(os.path.join(sft_dir, 'wandb'))), 'no offline wandb run'
    with open(os.path.join(sft_dir, 'config.yaml')) as f:
        assert 'name: sft' in f.read()
    metrics = read_metrics(sft_dir)
    train_lines = [m for m in metrics if m['split'] == 'train']
    eval_lines = [m for m in metrics if m['split'] == 'eval']
    assert [m['step'] for m in eval_lines] == [0, 8, 16]
    assert {'loss/train', 'logps_train/chosen', 'grad_norm', 'examples_per_second', 'counters/examples',
            'counters/updates'} <= set(train_lines[-1])
    assert train_lines[-1]['counters/examples'] == 16 and train_lines[-1]['counters/updates'] == 4
    assert eval_lines[-1]['loss/eval'] < eval_lines[0]['loss/eval'], 'SFT did not lower the eval NLL'
    for step_dir, step in (('step-8', 8), ('LATEST', 16)):
        for name in ('policy.pt', 'optimizer.pt', 'scheduler.pt'):
            checkpoint = load_checkpoint(os.path.join(sft_dir, step_dir, name))
            assert set(checkpoint) == {'step_idx', 'state', 'metrics'} and checkpoint['step_idx'] == step
    assert not os.path.exists(os.path.join(sft_dir, 'step-16')), 'the last eval should not write a step checkpoint'
    with open(os.path.join(sft_dir, 'samples.jsonl')) as f:
        samples = [json.loads(line) for line in f]
    assert samples and all(isinstance(s['policy'], str) for s in samples)

    # the HF export holds exactly the final policy weights
    from transformers import AutoModelForCausalLM, AutoTokenizer
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(sft_dir, 'hf'))
    AutoTokenizer.from_pretrained(os.path.join(sft_dir, 'hf'))
    state = load_checkpoint(os.path.join(sft_dir, 'LATEST', 'policy.pt'))['state']
    for k, v in exported.state_dict().items():
        torch.testing.assert_close(v, state[k])

    tdpo_dir = str(tmp_path / 'tdpo')
    run_train([*SMALL, 'loss=tdpo', f'datasets=[{data}]', 'exp_name=e2e_tdpo', f'local_run_dir={tdpo_dir}',
               'n_examples=8', 'eval_every=8', f'model.archive={sft_dir}/LATEST/policy.pt', 'wandb.enabled=false'], tmp_path)
    metrics = read_metrics(tdpo_dir)
    first_eval = next(m for m in metrics if m['split'] == 'eval')
    # policy and reference both start from the archive: zero SeqKL, loss log 2, and the SFT model's log-probs
    assert first_eval['step'] == 0
    assert abs(first_eval['kl_eval/chosen']) < 1e-4 and abs(first_eval['kl_eval/rejected']) < 1e-4
    assert first_eval['loss/eval'] == pytest.approx(math.log(2), abs=1e-5)
    assert first_eval['logps_eval/chosen'] == pytest.approx(eval_lines[-1]['logps_eval/chosen'], rel=1e-4)
    last_eval = [m for m in metrics if m['split'] == 'eval'][-1]
    assert last_eval['step'] == 8 and last_eval['kl_eval/chosen'] > 0
    train_line = next(m for m in metrics if m['split'] == 'train')
    assert {'rewards_train/accuracies', 'rewards_train/margins', 'kl_train/margin', 'logps_train/rejected'} <= set(train_line)


def test_debug_mode_writes_no_checkpoint_and_no_wandb(tmp_path):
    data = write_hh_file(tmp_path / 'pairs.jsonl')
    run_dir = str(tmp_path / 'run')
    run_train([*SMALL, 'loss=sft', f'datasets=[{data}]', 'exp_name=dbg', f'local_run_dir={run_dir}', 'n_examples=4',
               'debug=true', 'n_eval_examples=0'], tmp_path)
    assert sorted(os.listdir(run_dir)) == ['.lock', 'config.yaml', 'metrics.jsonl', 'run.json']


@pytest.mark.parametrize('args, message', [
    (['loss=sft'], 'missing required config keys'),
    (['loss=sft', 'exp_name=x', 'model=nope'], "Could not find 'model/nope'"),
    (['loss=sft', 'exp_name=x', 'trainer=Nope'], 'valid: BasicTrainer'),
    (['loss=dpo', 'exp_name=x'], 'loss.beta'),
    (['loss=tdpo', 'exp_name=x', 'loss.beta=0'], 'loss.beta must be a positive number'),
    (['loss=sft', 'exp_name=x', 'batch_size=6', 'gradient_accumulation_steps=4'], 'must be divisible'),
    (['loss=sft', 'exp_name=x', 'max_prompt_length=512', 'max_length=512'], 'max_prompt_length'),
    (['loss=sft', 'exp_name=x', 'keep_checkpoints=0'], 'keep_checkpoints'),
    (['loss=sft', 'exp_name=x', 'on_bad_example=ignore'], 'valid: error, skip'),
    (['loss=sft', 'exp_name=x', 'resume_from=/nonexistent/step-8'], 'not a complete checkpoint directory'),
    # these divided by zero, raised in the trainer after the models were loaded, or exited 0 after no update
    (['loss=sft', 'exp_name=x', 'batch_size=0'], 'config error: batch_size must be a whole number >= 1, got 0'),
    (['loss=sft', 'exp_name=x', 'optimizer=Adagrad'], "config error: unknown optimizer='Adagrad'"),
    (['loss=sft', 'exp_name=x', 'n_examples=-4'], 'config error: n_examples must be null or a whole number >= 1'),
])
def test_config_errors_are_clear(tmp_path, args, message):
    run_dir = tmp_path / 'run'
    code, out = run_train(['model=tiny', f'local_dirs=[{CACHE}]', f'local_run_dir={run_dir}', *args], tmp_path,
                          expect_ok=False)
    assert code != 0 and message in out, out[-2000:]
    assert 'Traceback' not in out and not run_dir.exists()  # stopped before the run directory and any model
    if message.startswith('config error:'):
        assert out.strip().splitlines() == [out.strip()], out[-2000:]  # one line


def test_unknown_dataset_lists_valid_names(tmp_path):
    code, out = run_train([*SMALL, 'loss=sft', 'exp_name=x', 'datasets=[nope]', f'local_run_dir={tmp_path}/r',
                           'wandb.enabled=false'], tmp_path, expect_ok=False)
    assert code != 0 and "unknown dataset 'nope'" in out and 'hh, shp, se' in out and 'Traceback' not in out


def test_fewer_examples_than_one_batch_is_a_data_error(tmp_path):
    data = write_hh_file(tmp_path / 'pairs.jsonl', n=3)
    code, out = run_train([*SMALL, 'loss=sft', 'exp_name=x', f'datasets=[{data}]', f'local_run_dir={tmp_path}/r',
                           'n_eval_examples=0', 'wandb.enabled=false'], tmp_path, expect_ok=False)
    assert code != 0 and 'fewer than one batch of 4' in out and 'Traceback' not in out, out[-2000:]


def test_fsdp_bfloat16_run_starts_with_zero_kl_and_log2(tmp_path):
    """Under FSDPTrainer with bfloat16 mixed precision the policy computes in bfloat16, and the
    default reference precision (model.reference_dtype=null) follows it, so a run starting from policy ==
    reference logs SeqKL 0 and loss log 2 at its first evaluation (a float16 or float32 reference does not:
    tests/test_trainer.py). initializer_range=0.3: logits of a trained model's size."""
    data = write_hh_file(tmp_path / 'pairs.jsonl')
    run_dir = str(tmp_path / 'fsdp_bf16')
    _, out = run_train([*SMALL, 'loss=tdpo', 'trainer=FSDPTrainer', 'model.fsdp_policy_mp=bfloat16',
                        '+model.random_init.initializer_range=0.3', f'datasets=[{data}]', 'exp_name=fsdp_bf16',
                        f'local_run_dir={run_dir}', 'n_examples=4', 'sample_during_eval=false', 'wandb.enabled=false'],
                       tmp_path)
    assert 'reference model in bfloat16' in out
    first_eval = next(m for m in read_metrics(run_dir) if m['split'] == 'eval')
    assert first_eval['step'] == 0
    assert max(abs(first_eval['kl_eval/chosen']), abs(first_eval['kl_eval/rejected'])) < EQUAL_MODELS_KL_BOUND, first_eval
    assert first_eval['loss/eval'] == pytest.approx(math.log(2), abs=1e-6)
