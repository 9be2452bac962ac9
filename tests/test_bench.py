"""bench/bench_tdpo_step.py's arithmetic behind the model FLOPs utilisation that bench/gpu_check.sh reports
model FLOPs against a hand count, the model shapes' sizes, the peak table, and MFU as a worker
computes it (on the CPU, with a given peak)."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT

_spec = importlib.util.spec_from_file_location('bench_tdpo_step', os.path.join(ROOT, 'bench', 'bench_tdpo_step.py'))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def hand_count(batch, length, width, inter, layers, heads, kv_heads, head_dim, vocab):
    """FLOPs of one TDPO step by hand: a (out × in) weight costs 2·out·in per token (a multiply and an add);
    q, k, v, o, gate, up, down per layer, and lm_head once; causal attention is half of full attention,
    whose QKᵀ and AV each cost 2·length·heads·head_dim per token and layer. Policy forward + backward = 3
    forwards, reference = 1."""
    projections = (width * heads * head_dim + 2 * width * kv_heads * head_dim + heads * head_dim * width
                   + 3 * width * inter)
    forward_per_token = 2 * (layers * projections + vocab * width) + layers * (2 * 2 * length * heads * head_dim) / 2
    return 4 * forward_per_token * batch * length


@pytest.mark.parametrize('tied', [True, False])
def test_model_flops_against_a_hand_count(tied):
    from transformers import LlamaConfig, LlamaForCausalLM
    dims = dict(width=64, inter=160, layers=3, heads=4, kv_heads=2, head_dim=16, vocab=1000)
    with torch.device('meta'):
        model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                             vocab_size=1000, tie_word_embeddings=tied))
    assert bench.model_flops_per_step(model, 3, 50) == hand_count(3, 50, **dims)


def test_llama_1b_shape_has_its_size():
    """The shape's comment: 1.07B parameters at vocabulary 49,152 and 1.28B at 151,936 (tied embeddings)."""
    from transformers import LlamaForCausalLM
    for vocab, billions in ((49152, 1.07), (151936, 1.28)):
        with torch.device('meta'):
            model = LlamaForCausalLM(bench.model_config(vocab, 'llama-1b'))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.005)
        assert bench.model_flops_per_step(model, 8, 1024) == hand_count(8, 1024, 2048, 8192, 16, 32, 8, 64, vocab)


# The dense bf16 tensor-core peak from each chip's own figures (NVIDIA's H100 and A100 architecture white
# papers): SMs x bf16 FLOPs per clock per SM (dense, no sparsity; a multiply-add is 2) x boost clock (GHz).
# Hopper's SM does 4 tensor cores x 512 bf16 multiply-adds per clock = 4096 FLOPs, Ampere's 4 x 256 = 2048.
CHIPS = {'NVIDIA H100 80GB HBM3': (132, 4096, 1.830),  # H100 SXM5
         'NVIDIA H100 PCIe': (114, 4096, 1.620),
         'NVIDIA H200': (132, 4096, 1.830),            # the H100 SXM5's GH100 with more memory
         'NVIDIA A100-SXM4-80GB': (108, 2048, 1.410),
         'NVIDIA A100 80GB PCIe': (108, 2048, 1.410)}


@pytest.mark.parametrize('name', list(CHIPS))
def test_peak_of_device_names(name):
    sms, flops_per_clock, ghz = CHIPS[name]
    assert bench.peak_tflops(name) == pytest.approx(sms * flops_per_clock * ghz * 1e9 / 1e12, abs=0.5)


def test_peak_of_a_device_name_is_its_most_specific_entry():
    """Names are matched by substring ('H100' is in 'H100 PCIe'): every entry, inside a device name, gives its
    own peak, not a shorter entry's, whatever the table's order; unknown devices give None."""
    for key, tflops in bench.PEAK_BF16_TFLOPS.items():
        for name in (f'NVIDIA {key}', f'NVIDIA {key} 94GB'):
            longest = max((k for k in bench.PEAK_BF16_TFLOPS if k in name), key=len)
            assert longest == key, (name, longest)
            assert bench.peak_tflops(name) == tflops, name
    assert bench.peak_tflops('NVIDIA H100 NVL') != bench.peak_tflops('NVIDIA H100 80GB HBM3')
    for unknown in ('Tesla T4', 'NVIDIA A10', 'NVIDIA GeForce RTX 4090', 'cpu'):
        assert bench.peak_tflops(unknown) is None, unknown


def test_worker_reports_mfu_of_its_model_flops_and_step_time():
    """MFU = model FLOPs per second / peak: from the hand count and the median of the step times the worker
    reports, and at least what the hand count over the whole subprocess's wall time (an upper bound of each
    step's time) gives."""
    cmd = [sys.executable, os.path.join(ROOT, 'bench', 'bench_tdpo_step.py'), '--worker', 'fused:512', '--layers', '1',
           '--batch', '2', '--length', '16', '--prompt-length', '4', '--steps', '3', '--warmup', '0', '--threads', '1',
           '--dtype', 'fp32', '--peak-tflops', '0.5']
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, TOKEN_STATS_COMPILE='0'))
    wall = time.perf_counter() - start
    line = next((l for l in proc.stdout.splitlines() if l.startswith('RESULT ')), None)
    assert line, proc.stderr[-3000:]
    result = json.loads(line[len('RESULT '):])
    flops = hand_count(2, 16, 576, 1536, 1, 9, 3, 64, 512)
    assert result['flops_per_step'] == flops
    times = result['times_s']
    assert len(times) == 3 and all(0 < t < wall for t in times)
    median = sorted(times)[1]
    assert result['mfu'] == pytest.approx(flops / median / 0.5e12, rel=1e-9)
    assert flops / wall / 0.5e12 <= result['mfu']
