"""evaluate.py: its KL estimate (kl_estimates) against a hand computation on a tiny random Llama (one
unpadded sequence at a time, log-softmax by hand, sums over response tokens only), and the entry point
end to end on model=tiny: policy == reference gives KL 0 and equal rewards; a run directory, its hf/
export and its checkpoints load to the same weights."""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import evaluate
from helpers import CACHE, ROOT, write_hh_file

VOCAB, EOS, PAD = 50, 2, 0


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    """Tiny matrices: one thread is faster, and much faster when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


# prompts and responses of different lengths, so right padding and masking matter
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
RESPONSES = [[20, 21, 22, EOS], [23, 24, 25, 26, 27, 28, 29], [30, EOS]]


@torch.no_grad()
def by_hand(policy, reference):
    """Per sample: sum over response tokens of log p_policy - log p_ref, and of the full-vocabulary KL."""
    log_ratio, seq_kl = [], []
    for p, r in zip(PROMPTS, RESPONSES):
        ids = torch.tensor([p + r])
        lp = policy(ids).logits[0].double().log_softmax(-1)
        lr = reference(ids).logits[0].double().log_softmax(-1)
        total_ratio = total_kl = 0.0
        for t in range(len(p), len(p) + len(r)):  # token t is predicted by the logits at t - 1
            total_ratio += (lp[t - 1, ids[0, t]] - lr[t - 1, ids[0, t]]).item()
            total_kl += (lp[t - 1].exp() * (lp[t - 1] - lr[t - 1])).sum().item()
        log_ratio.append(total_ratio)
        seq_kl.append(total_kl)
    return log_ratio, seq_kl


def test_policy_equal_to_reference_gives_zero_kl():
    model = tiny_llama(0)
    out = evaluate.kl_estimates(model, model, PROMPTS, RESPONSES, PAD, batch_size=3)
    assert out['log_ratio'] == [0.0, 0.0, 0.0]
    assert out['seq_kl'] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)


def test_perturbed_policy_matches_hand_computation():
    reference = tiny_llama(0)
    policy = tiny_llama(0)
    with torch.no_grad():
        torch.manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    log_ratio, seq_kl = by_hand(policy, reference)
    assert all(abs(x) > 1e-3 for x in log_ratio)  # the perturbation is visible
    for batch_size in (1, 2, 3):  # 3: one right-padded batch of all samples
        out = evaluate.kl_estimates(policy, reference, PROMPTS, RESPONSES, PAD, batch_size=batch_size)
        assert out['log_ratio'] == pytest.approx(log_ratio, abs=1e-4)
        assert out['seq_kl'] == pytest.approx(seq_kl, abs=1e-4)
        assert all(k > 0 for k in out['seq_kl'])


def test_cut_after_eos():
    assert evaluate.cut_after_eos([4, 5, EOS, PAD, PAD], EOS) == [4, 5, EOS]
    assert evaluate.cut_after_eos([4, 5, 6], EOS) == [4, 5, 6]


def run_script(script, *args):
    proc = subprocess.run([sys.executable, '-u', script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


SMALL = ['samples_per_prompt=2', 'max_new_tokens=6', 'batch_size=8', 'n_prompts=3']


def test_policy_equal_to_reference_gives_zero_kl_and_equal_rewards(tmp_path):
    pairs = write_hh_file(tmp_path / 'pairs.jsonl', n=5)
    out = tmp_path / 'eval.json'
    run_script('evaluate.py', 'policy=model:tiny', 'reference=model:tiny', f'prompts={pairs}', f'out={out}', *SMALL)
    result = json.loads(out.read_text())
    assert result['n_prompts'] == 3 and result['n_samples'] == 6
    assert result['kl'] == 0.0 and abs(result['seq_kl']) < 1e-5
    assert result['policy_reward'] == result['reference_reward']  # same weights, same seed: the same samples
    assert result['examples'][0]['policy'] == result['examples'][0]['reference']


def test_run_dir_hf_export_and_checkpoint_evaluate_the_same_weights(tmp_path):
    """A trained run, evaluated as its run directory (hf/ export), its LATEST/ and its halfway step-4/
    checkpoint in one multirun; the hf/ export and LATEST/ hold the same weights."""
    pairs = write_hh_file(tmp_path / 'pairs.jsonl', n=16)
    run_dir = tmp_path / 'run'
    run_script('train.py', 'model=tiny', f'local_dirs=[{CACHE}]', 'loss=dpo', 'loss.beta=0.1', f'datasets=[{pairs}]',
               f'local_run_dir={run_dir}', 'exp_name=ev', 'batch_size=2', 'n_examples=8', 'eval_every=4',
               'n_eval_examples=2', 'eval_fraction=0.25', 'max_length=48', 'max_prompt_length=24', 'optimizer=AdamW',
               'lr=1e-2', 'warmup_steps=0', 'do_first_eval=false', 'sample_during_eval=false', 'wandb.enabled=false')
    policies = f'{run_dir},{run_dir}/LATEST,{run_dir}/step-4'
    run_script('evaluate.py', '-m', f'policy={policies}', 'reference=model:tiny', f'prompts={pairs}', *SMALL,
               f'hydra.sweep.dir={tmp_path}/multirun')
    final, latest, half = (json.loads((path / 'eval.json').read_text())
                           for path in (run_dir, run_dir / 'LATEST', run_dir / 'step-4'))
    assert final['policy'].endswith('/hf') and final['examples_seen'] == latest['examples_seen'] == 8
    assert half['examples_seen'] == 4
    assert final['kl'] == pytest.approx(latest['kl'], abs=1e-4) and final['policy_reward'] == latest['policy_reward']
    assert final['kl'] != pytest.approx(half['kl'], abs=1e-3)  # training moved the policy between the two
    assert final['reference_reward'] == half['reference_reward']  # the reference was sampled once, the same


def test_bad_inputs_name_the_problem(tmp_path):
    for args, message in ((['policy=/nonexistent', 'reference=model:tiny', 'prompts=x.jsonl'], 'not a run directory'),
                          (['policy=model:tiny', 'reference=model:tiny', 'prompts=x.jsonl'], 'set out='),
                          (['policy=model:tiny', 'reference=model:tiny', f'prompts={tmp_path}/none.txt',
                            f'out={tmp_path}/e.json'], 'expected a local'),
                          (['policy=model:tiny', 'reference=model:tiny'], 'prompts')):
        proc = subprocess.run([sys.executable, 'evaluate.py', *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode != 0 and message in proc.stdout + proc.stderr, (args, proc.stderr[-2000:])


def test_evaluation_computes_in_the_precision_the_run_trained_in(tmp_path):
    """evaluate.py reads the policy's run config.yaml, so the KL it reports is the KL the run trained
    against: an FSDP run with bfloat16 mixed precision computed its policy and (reference_dtype null) its
    reference in bfloat16; a model without a run is evaluated in float32."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import model_loading
    from helpers import compose_config
    run_dir, pairs = tmp_path / 'run', write_hh_file(tmp_path / 'pairs.jsonl', n=5)
    checkpoint = run_dir / 'step-4'
    checkpoint.mkdir(parents=True)
    model = model_loading.load_model(compose_config(['model=tiny', 'exp_name=x']).model, 'float32', CACHE)
    torch.save({'step_idx': 4, 'state': model.state_dict(), 'metrics': {}}, checkpoint / 'policy.pt')  # untrained
    for reference_dtype, expected in ((None, ('bfloat16', 'bfloat16')), ('float32', ('bfloat16', 'float32'))):
        overrides = ['model=tiny', 'loss=tdpo', 'exp_name=x', f'local_dirs=[{CACHE}]', f'local_run_dir={run_dir}',
                     'trainer=FSDPTrainer', 'model.fsdp_policy_mp=bfloat16']
        config = compose_config(overrides + ([f'model.reference_dtype={reference_dtype}'] if reference_dtype else []))
        OmegaConf.resolve(config)
        OmegaConf.save(config, run_dir / 'config.yaml')
        assert evaluate.run_dtypes(*evaluate.resolve_model_path(str(checkpoint))) == expected
    assert evaluate.run_dtypes(*evaluate.resolve_model_path('model:tiny')) == ('float32', 'float32')
    with initialize_config_dir(config_dir=os.path.join(ROOT, 'config'), version_base=None):
        eval_config = compose('evaluate', overrides=[f'policy={checkpoint}', 'reference=model:tiny', f'prompts={pairs}',
                                                     *SMALL, 'score_reference=false'])
        result = evaluate.evaluate(eval_config)
        assert next(evaluate.load(str(checkpoint), 'bfloat16')[0].parameters()).dtype == torch.bfloat16
    assert (result['policy_dtype'], result['reference_dtype']) == ('bfloat16', 'float32')
    assert result['kl'] != 0  # the same weights, in bfloat16 against float32: the precision is in the KL


def test_checkpoint_whose_weights_do_not_fit_its_run_model_is_one_line(tmp_path):
    """A checkpoint's policy.pt that does not fit the model its run's config.yaml names (a weight of another
    shape, or one missing) stops evaluate.py with one line naming the file, not a traceback."""
    from omegaconf import OmegaConf

    import model_loading
    from helpers import compose_config
    run_dir, pairs = tmp_path / 'run', write_hh_file(tmp_path / 'pairs.jsonl', n=5)
    config = compose_config(['model=tiny', 'exp_name=x', f'local_dirs=[{CACHE}]', f'local_run_dir={run_dir}'])
    OmegaConf.resolve(config)
    state = model_loading.load_model(config.model, 'float32', CACHE).state_dict()
    name = next(k for k in state if k.endswith('q_proj.weight'))
    for broken, message in (({**state, name: state[name][:, :-1]}, 'size mismatch'),
                            ({k: v for k, v in state.items() if k != name}, '1 of its weights missing')):
        checkpoint = run_dir / 'step-4'
        checkpoint.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, run_dir / 'config.yaml')
        torch.save({'step_idx': 4, 'state': broken, 'metrics': {}}, checkpoint / 'policy.pt')
        proc = subprocess.run([sys.executable, 'evaluate.py', f'policy={checkpoint}', 'reference=model:tiny',
                               f'prompts={pairs}', *SMALL], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
        assert f'{checkpoint}/policy.pt does not fit' in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
