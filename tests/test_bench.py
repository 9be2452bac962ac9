"""bench/bench_tdpo_step.py's arithmetic behind the model FLOPs utilisation that bench/gpu_check.sh reports
model FLOPs against a hand count, the model shapes' sizes, the peak table, and MFU as a worker
computes it (on the CPU, with a given peak)."""
import importlib.util
import json
import os
import subprocess
import sys

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


def test_peak_of_device_names():
    assert bench.peak_tflops('NVIDIA H100 80GB HBM3') == 989.0
    assert bench.peak_tflops('NVIDIA H100 PCIe') == 756.0
    assert bench.peak_tflops('NVIDIA H200') == 989.0
    assert bench.peak_tflops('NVIDIA A100-SXM4-80GB') == 312.0
    assert bench.peak_tflops('Tesla T4') is None


def test_worker_reports_mfu_of_its_model_flops_and_step_time():
    cmd = [sys.executable, os.path.join(ROOT, 'bench', 'bench_tdpo_step.py'), '--worker', 'fused:512', '--layers', '1',
           '--batch', '2', '--length', '16', '--prompt-length', '4', '--steps', '1', '--warmup', '0', '--threads', '1',
           '--dtype', 'fp32', '--peak-tflops', '0.5']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, TOKEN_STATS_COMPILE='0'))
    line = next((l for l in proc.stdout.splitlines() if l.startswith('RESULT ')), None)
    assert line, proc.stderr[-3000:]
    result = json.loads(line[len('RESULT '):])
    assert result['flops_per_step'] == hand_count(2, 16, 576, 1536, 1, 9, 3, 64, 512)
    assert result['mfu'] == pytest.approx(result['flops_per_step'] / result['step_s'] / 0.5e12, rel=1e-9)
