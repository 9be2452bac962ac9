"""The HH recipe (demo/hh.sh, `make hh`) end to end at tiny sizes, its arithmetic against hand-computed values,
its recorded log-probabilities against a direct transformers forward, and finished_run_keeps."""
import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from helpers import CACHE, ROOT, write_hh_file

sys.path.insert(0, os.path.join(ROOT, 'demo'))
import hh_report  # noqa: E402

TINY = {'MODEL': 'tiny', 'N_SFT': '16', 'N_TRAIN': '16', 'BATCH_SIZE': '4', 'MAX_LENGTH': '64',
        'MAX_PROMPT_LENGTH': '32', 'N_GEN': '3', 'MAX_NEW_TOKENS': '6', 'LR': '1e-3', 'SFT_LR': '1e-3',
        'CHECKPOINT_EVERY': '8', 'METHODS': 'dpo,tdpo1,tdpo2', 'EXTRA': f'local_dirs=[{CACHE}]'}


def run_recipe(hh_dir, **env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    env.update(TINY, HH_DIR=str(hh_dir), PYTHON=sys.executable, OMP_NUM_THREADS='1', **env_overrides)
    proc = subprocess.run(['bash', 'demo/hh.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def held_out_prompts(path, fraction):
    """The prompts of an HH file whose md5 bucket is below `fraction` (train.py's rule, computed here)."""
    prompts = []
    with open(path) as f:
        for line in f:
            chosen = json.loads(line)['chosen']
            prompt = chosen[:chosen.rfind('\n\nAssistant:') + len('\n\nAssistant:')]
            if int.from_bytes(hashlib.md5(prompt.encode()).digest()[:8], 'big') < fraction * 2 ** 64:
                prompts.append(prompt)
    return prompts


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---- arithmetic --------------------------------------------------------------------------------

def test_proportion_and_standard_error_by_hand():
    p, se, n = hh_report.proportion([True, True, False, True])
    assert (p, n) == (0.75, 4)
    assert se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))  # 0.2165...
    assert hh_report.proportion([True] * 3)[1] == 0.0


def test_paired_difference_by_hand():
    # d = a − b = [1, 0, 0, 1, -1]: mean 0.2; sample variance Σ(d−0.2)² / 4 = (0.64·2 + 0.04·2 + 1.44) / 4 = 0.7
    d, se, n = hh_report.paired_difference([1, 0, 1, 1, 0], [0, 0, 1, 0, 1])
    assert (d, n) == (pytest.approx(0.2), 5)
    assert se == pytest.approx(math.sqrt(0.7 / 5))


def test_pair_statistics_by_hand():
    rec = lambda c, r, rc, rr, kc=0.0, kr=0.0: {'chosen_logp': c, 'rejected_logp': r, 'ref_chosen_logp': rc,
                                               'ref_rejected_logp': rr, 'seqkl_chosen': kc, 'seqkl_rejected': kr,
                                               'correct': c - rc > r - rr}
    records = [rec(-10, -12, -11, -11),            # margins +1 vs −1: correct; logp order right
               rec(-10, -9, -10, -9),              # a tie (0 vs 0): wrong
               rec(-20, -5, -22, -4, 0.0, 30.0),   # margins +2 vs −1: correct; logp wrong; TDPO reward 0.2 vs 2.9
               rec(-8, -7, -7, -8)]                # −1 vs +1: wrong
    s = hh_report.pair_statistics(records, beta=0.1, tdpo=True)
    assert (s['n'], s['accuracy'], s['logp_accuracy']) == (4, 0.5, 0.25)
    assert s['se'] == pytest.approx(math.sqrt(0.25 / 4))
    # TDPO rewards β(log-ratio + SeqKL): pair 1 0.1 > −0.1, pair 2 0 = 0 (wrong), pair 3 0.2 < 2.9, pair 4 wrong
    assert s['tdpo_reward_accuracy'] == 0.25
    assert s['seqkl_rejected'] == pytest.approx(7.5) and s['seqkl_chosen'] == 0
    # DPO's logged rewards are β·log-ratio: its reward accuracy is the accuracy
    assert hh_report.pair_statistics(records, beta=0.1, tdpo=False)['tdpo_reward_accuracy'] == 0.5


# ---- the recipe end to end ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def recipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('hh')
    data = write_hh_file(tmp / 'pairs.jsonl', n=64)
    hh_dir = tmp / 'hh'
    output = run_recipe(hh_dir, DATA=data)
    return {'data': data, 'dir': hh_dir, 'output': output}


def test_recipe_writes_every_file_with_every_held_out_pair(recipe):
    hh_dir, methods = recipe['dir'], ['dpo', 'tdpo1', 'tdpo2']
    expected_prompts = held_out_prompts(recipe['data'], 0.25)
    assert len(expected_prompts) >= 8
    for name in ['sft'] + methods:
        assert os.path.exists(hh_dir / 'runs' / name / 'hf' / 'config.json')
        records = read_jsonl(hh_dir / 'pairs' / f'{name}.jsonl')
        assert len(records) == len(expected_prompts)
        for r in records:
            assert r['chosen_ids'][-1] == r['rejected_ids'][-1]  # both end with EOS (nothing is truncated here)
            assert r['correct'] == (r['chosen_logp'] - r['ref_chosen_logp'] > r['rejected_logp'] - r['ref_rejected_logp'])
        assert len(read_jsonl(hh_dir / 'samples' / f'{name}.jsonl')) == 3
    summary = json.load(open(hh_dir / 'hh.json'))
    assert set(summary['methods']) == {'sft', *methods}
    for name in methods:
        m, records = summary['methods'][name], read_jsonl(hh_dir / 'pairs' / f'{name}.jsonl')
        correct = sum(r['correct'] for r in records)
        assert m['n'] == len(expected_prompts) and m['accuracy'] == correct / len(records)
        assert m['se'] == pytest.approx(math.sqrt(m['accuracy'] * (1 - m['accuracy']) / m['n']))
        assert m['entropy'] > 0 and m['seqkl_chosen'] > 0 and m['seqkl_rejected'] > 0
    assert summary['methods']['sft']['accuracy'] == 0  # its own reference: every margin ties
    assert set(summary['paired']) == {'tdpo1-dpo', 'tdpo2-dpo'}
    assert summary['paper']['methods']['tdpo2']['accuracy'] == 67.33
    assert os.path.getsize(hh_dir / 'hh.png') > 1000 and 'TDPO2' in open(hh_dir / 'hh.md').read()


def test_finished_runs_keep_no_optimizer_state(recipe):
    runs = recipe['dir'] / 'runs'
    for root, _, files in os.walk(runs):
        assert 'optimizer.pt' not in files, root
    assert os.path.exists(runs / 'sft' / 'LATEST' / 'policy.pt')       # the methods' model.archive
    assert not os.path.exists(runs / 'dpo' / 'LATEST' / 'policy.pt')   # its weights are hf/'s
    for name in ('sft', 'dpo'):
        manifest = json.load(open(runs / name / 'LATEST' / 'manifest.json'))
        assert all(os.path.getsize(runs / name / 'LATEST' / f) == size for f, size in manifest['files'].items())


def test_recorded_log_probabilities_match_a_direct_forward(recipe):
    import transformers
    runs = recipe['dir'] / 'runs'
    policy = transformers.AutoModelForCausalLM.from_pretrained(runs / 'tdpo2' / 'hf', dtype=torch.float32).eval()
    reference = transformers.AutoModelForCausalLM.from_pretrained(runs / 'sft' / 'hf', dtype=torch.float32).eval()
    for r in read_jsonl(recipe['dir'] / 'pairs' / 'tdpo2.jsonl')[:3]:
        for side in ('chosen', 'rejected'):
            ids = torch.tensor([r['prompt_ids'] + r[f'{side}_ids']])
            positions = range(len(r['prompt_ids']) - 1, ids.shape[1] - 1)  # logits that predict response tokens
            with torch.no_grad():
                logp = policy(ids).logits[0].double().log_softmax(-1)
                ref_logp = reference(ids).logits[0].double().log_softmax(-1)
            tokens = r[f'{side}_ids']
            assert r[f'{side}_logp'] == pytest.approx(sum(logp[t, y].item() for t, y in zip(positions, tokens)), abs=1e-3)
            assert r[f'ref_{side}_logp'] == pytest.approx(sum(ref_logp[t, y].item() for t, y in zip(positions, tokens)), abs=1e-3)
            seq_kl = sum((ref_logp[t].exp() * (ref_logp[t] - logp[t])).sum().item() for t in positions)
            assert r[f'seqkl_{side}'] == pytest.approx(seq_kl, rel=1e-3, abs=1e-4)


def test_rerun_skips_finished_stages_and_rescores_a_damaged_file(recipe):
    pairs = recipe['dir'] / 'pairs' / 'tdpo1.jsonl'
    text = pairs.read_text()
    pairs.write_text(text[:len(text) // 2])  # truncated
    output = run_recipe(recipe['dir'], DATA=recipe['data'])
    assert output.count('nothing to do') == 4, output[-3000:]
    assert f'{pairs} is damaged' in output and 'scoring tdpo1 again' in output
    assert pairs.read_text() == text  # the same scores again


def test_extending_a_finished_run_without_optimizer_state_is_one_line(recipe):
    env = {k: v for k, v in os.environ.items() if not k.startswith('WANDB_')}
    run = recipe['dir'] / 'runs' / 'dpo'
    proc = subprocess.run([sys.executable, '-u', 'train.py', 'model=tiny', f'local_dirs=[{CACHE}]', 'loss=dpo',
                           'loss.beta=0.1', 'exp_name=hh_dpo', f'local_run_dir={run}', 'resume=true',
                           f'datasets=[{recipe["data"]}]', 'eval_fraction=0.25', 'batch_size=4', 'max_length=64',
                           'max_prompt_length=32', 'n_examples=32', 'n_eval_examples=0', 'wandb.enabled=false',
                           # the run as the recipe launched it (else resume refuses the changed keys first)
                           f'lr={TINY["LR"]}', 'optimizer=AdamW', 'warmup_steps=4',
                           f'model.archive={recipe["dir"] / "runs" / "sft" / "LATEST" / "policy.pt"}'],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('cannot train 16 more examples from') and 'finished_run_keeps=export' in last, proc.stderr[-2000:]
    assert 'Traceback' not in proc.stderr


def test_eval_data_scores_every_pair_of_that_file(tmp_path):
    train_file = write_hh_file(tmp_path / 'train.jsonl', n=24)
    eval_file = tmp_path / 'eval.jsonl'
    with open(eval_file, 'w') as f:  # 5 pairs, two of them with the same prompt
        for i in (100, 101, 102, 103, 103):
            prompt = f'\n\nHuman: What is {i} plus one?\n\nAssistant:'
            f.write(json.dumps({'chosen': prompt + f' It is {i + 1}.', 'rejected': prompt + ' Maybe 7' + '.' * (i % 5)}) + '\n')
    run_recipe(tmp_path / 'hh', DATA=train_file, EVAL_DATA=str(eval_file), METHODS='tdpo2', N_GEN='0')
    assert len(read_jsonl(tmp_path / 'hh' / 'pairs' / 'tdpo2.jsonl')) == 5
    assert json.load(open(tmp_path / 'hh' / 'hh.json'))['methods']['tdpo2']['n'] == 5


def test_missing_default_data_is_one_line(tmp_path):
    env = {**os.environ, 'HH_DIR': str(tmp_path / 'hh'), 'PYTHON': sys.executable, 'SHARED': str(tmp_path / 'absent')}
    env.pop('DATA', None)
    proc = subprocess.run(['bash', 'demo/hh.sh'], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and not os.path.exists(tmp_path / 'hh' / 'runs')
    assert proc.stderr.strip().splitlines() == [
        f'hh: no training data: {tmp_path}/absent/data/hh-rlhf-harmless-sample/rows.jsonl.gz is absent ({tmp_path}/absent '
        f'is not beside this clone); point DATA at HH-format pairs (any format train.py reads), e.g. '
        f'DATA=/path/to/hh-rlhf/harmless-base/train.jsonl.gz make hh']
