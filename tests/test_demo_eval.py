"""The demo evaluator's KL estimate (demo/sentiment.py kl_estimates) against a hand computation on a
tiny random Llama: one unpadded sequence at a time, log-softmax by hand, sums over response tokens only."""
import importlib.util
import os

import pytest
import torch
import transformers

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location('demo_sentiment', os.path.join(ROOT, 'demo', 'sentiment.py'))
sentiment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sentiment)

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
    out = sentiment.kl_estimates(model, model, PROMPTS, RESPONSES, PAD, batch_size=3)
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
        out = sentiment.kl_estimates(policy, reference, PROMPTS, RESPONSES, PAD, batch_size=batch_size)
        assert out['log_ratio'] == pytest.approx(log_ratio, abs=1e-4)
        assert out['seq_kl'] == pytest.approx(seq_kl, abs=1e-4)
        assert all(k > 0 for k in out['seq_kl'])


def test_cut_after_eos():
    assert sentiment.cut_after_eos([4, 5, EOS, PAD, PAD], EOS) == [4, 5, EOS]
    assert sentiment.cut_after_eos([4, 5, 6], EOS) == [4, 5, 6]
