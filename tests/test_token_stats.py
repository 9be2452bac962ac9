"""token_stats against the reference-compatible `losses.tdpo_get_batch_logps` + `tdpo_loss`:
values and gradients of the chunked (logits) and fused (hidden states + output embedding) paths, with
masking, empty responses, chunk sizes that do not divide the row count, bf16 logits, tied weights,
compiled and eager chunk math; and the bytes autograd keeps for backward."""
import pytest
import torch

import token_stats
from token_stats import chunked_sequence_stats, fused_sequence_stats
from losses import tdpo_get_batch_logps, tdpo_loss

B, T, V, H = 6, 11, 37, 8


@pytest.fixture(params=[True, False], ids=['compiled', 'eager'])
def compile_mode(request, monkeypatch):
    monkeypatch.setattr(token_stats, 'COMPILE', request.param)
    return request.param


def make_labels(generator, batch=B, length=T, vocab=V):
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, :3] = -100          # prompt
    labels[1, :] = -100           # empty response
    labels[2, 7:] = -100          # padding
    labels[batch - 2, 5] = -100     # a hole in the middle
    return labels


def make_inputs(seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * scale / H ** 0.5
    ref_hidden = hidden + 0.3 * torch.randn(B, T, H, generator=g)
    ref_weight = weight + 0.3 * torch.randn(V, H, generator=g) / H ** 0.5
    return hidden, weight, ref_hidden, ref_weight, make_labels(g)


def upstream(seed=1):
    """Random weights for a linear loss of the three outputs, so every gradient path is exercised."""
    return torch.randn(3, B, generator=torch.Generator().manual_seed(seed))


def linear_loss(stats, w):
    return sum((wi * s).sum() for wi, s in zip(w, stats))


def grads_of(fn, leaves, w):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    stats = fn(*leaves)
    linear_loss(stats, w).backward()
    return [s.detach() for s in stats], [x.grad for x in leaves]


def assert_close(actual, expected, atol=2e-5, rtol=2e-5):
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol)


@pytest.mark.parametrize('chunk_rows', [1, 4, 7, 1000, None])
def test_chunked_matches_naive(chunk_rows, compile_mode):
    hidden, weight, ref_hidden, ref_weight, labels = make_inputs()
    logits, ref_logits, w = hidden @ weight.T, ref_hidden @ ref_weight.T, upstream()
    expected, (expected_grad,) = grads_of(lambda z: tdpo_get_batch_logps(z, ref_logits, labels), [logits], w)
    actual, (grad,) = grads_of(lambda z: chunked_sequence_stats(z, ref_logits, labels, chunk_rows), [logits], w)
    assert_close(actual, expected, atol=1e-4)
    assert_close([grad], [expected_grad])
    assert (actual[0][1] == 0).all() and (grad[1] == 0).all()          # empty response
    assert (grad[:, :2] == 0).all() and (grad[:, -1] == 0).all()       # prompt and last position


@pytest.mark.parametrize('chunk_rows', [1, 5, 64, None])
def test_fused_matches_naive(chunk_rows, compile_mode):
    hidden, weight, ref_hidden, ref_weight, labels = make_inputs(seed=2)
    w = upstream(3)
    expected, expected_grads = grads_of(
        lambda h, wt: tdpo_get_batch_logps(h @ wt.T, ref_hidden @ ref_weight.T, labels), [hidden, weight], w)
    actual, grads = grads_of(
        lambda h, wt: fused_sequence_stats(h, wt, ref_hidden, ref_weight, labels, chunk_rows), [hidden, weight], w)
    assert_close(actual, expected, atol=1e-4)
    assert_close(grads, expected_grads, atol=5e-5)


def test_reference_gets_no_gradient():
    hidden, weight, ref_hidden, ref_weight, labels = make_inputs()
    ref_hidden.requires_grad_(), ref_weight.requires_grad_()
    ref_logits = (ref_hidden @ ref_weight.T)
    logits = (hidden @ weight.T).requires_grad_()
    linear_loss(chunked_sequence_stats(logits, ref_logits, labels), upstream()).backward()
    linear_loss(fused_sequence_stats(hidden.requires_grad_(), weight, ref_hidden, ref_weight, labels), upstream()).backward()
    assert ref_hidden.grad is None and ref_weight.grad is None and logits.grad is not None and hidden.grad is not None


@pytest.mark.parametrize('if_tdpo2', [True, False], ids=['tdpo2', 'tdpo1'])
def test_tdpo_loss_end_to_end(if_tdpo2):
    hidden, weight, ref_hidden, ref_weight, labels = make_inputs(seed=4)
    half = B // 2

    def loss(stats):
        margin, kl, _ = stats
        losses, chosen, rejected = tdpo_loss(margin[:half], margin[half:], kl[:half], kl[half:],
                                             beta=0.5, alpha=0.7, if_tdpo2=if_tdpo2)
        return losses.mean(), chosen, rejected

    def run(fn, leaves):
        leaves = [x.detach().clone().requires_grad_() for x in leaves]
        value, chosen, rejected = loss(fn(*leaves))
        value.backward()
        return [value.detach(), chosen, rejected], [x.grad for x in leaves]

    ref_logits = ref_hidden @ ref_weight.T
    expected, expected_grads = run(lambda h, wt: tdpo_get_batch_logps(h @ wt.T, ref_logits, labels), [hidden, weight])
    fused, fused_grads = run(lambda h, wt: fused_sequence_stats(h, wt, ref_hidden, ref_weight, labels, 4), [hidden, weight])
    assert_close(fused, expected, atol=1e-5)
    assert_close(fused_grads, expected_grads, atol=1e-6)
    logits = hidden @ weight.T
    naive_value, (naive_grad,) = run(lambda z: tdpo_get_batch_logps(z, ref_logits, labels), [logits])
    chunked_value, (chunked_grad,) = run(lambda z: chunked_sequence_stats(z, ref_logits, labels, 3), [logits])
    assert_close(chunked_value, naive_value, atol=1e-5)
    assert_close([chunked_grad], [naive_grad], atol=1e-7)
    assert naive_grad.abs().max() > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    hidden, weight, ref_hidden, ref_weight, labels = make_inputs(seed=5)
    logits, ref_logits, w = (hidden @ weight.T).to(dtype), (ref_hidden @ ref_weight.T).to(dtype), upstream()
    expected, (expected_grad,) = grads_of(lambda z: tdpo_get_batch_logps(z, ref_logits, labels), [logits], w)
    actual, (grad,) = grads_of(lambda z: chunked_sequence_stats(z, ref_logits, labels, 5), [logits], w)
    assert all(a.dtype == torch.float32 for a in actual) and grad.dtype == dtype
    assert_close(actual, expected, atol=1e-4)       # same low-precision inputs, float32 math
    assert_close([grad.float()], [expected_grad.float()], atol=1e-2, rtol=1e-2)  # one rounding to dtype


def test_fused_bf16_matches_naive_on_bf16_logits():
    hidden, weight, ref_hidden, ref_weight, labels = (x.bfloat16() if x.is_floating_point() else x for x in make_inputs(6))
    w = upstream()
    expected, expected_grads = grads_of(
        lambda h, wt: tdpo_get_batch_logps(h @ wt.T, ref_hidden @ ref_weight.T, labels), [hidden, weight], w)
    actual, grads = grads_of(
        lambda h, wt: fused_sequence_stats(h, wt, ref_hidden, ref_weight, labels, 4), [hidden, weight], w)
    assert_close(actual, expected, atol=0.1, rtol=1e-2)      # matmul blocking may round differently
    assert_close([g.float() for g in grads], [g.float() for g in expected_grads], atol=0.1, rtol=0.05)


def test_tied_weights():
    """weight is also the input embedding: both uses must accumulate into its gradient."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = make_labels(g)
    labels[labels != -100] = ids[labels != -100]
    mix = torch.randn(H, H, generator=g)
    embedding0 = torch.randn(V, H, generator=g)
    ref_hidden = torch.tanh(embedding0[ids] @ mix) * 2

    def run(stats_fn):
        embedding = embedding0.clone().requires_grad_()
        hidden = torch.tanh(embedding[ids] @ mix) * 2   # the "model": uses the embedding as input
        stats = stats_fn(hidden, embedding)              # ... and as output layer
        linear_loss(stats, upstream(8)).backward()
        return [s.detach() for s in stats], embedding.grad

    expected, expected_grad = run(lambda h, e: tdpo_get_batch_logps(h @ e.T, ref_hidden @ embedding0.T, labels))
    actual, grad = run(lambda h, e: fused_sequence_stats(h, e, ref_hidden, embedding0, labels, 3))
    assert_close(actual, expected, atol=1e-4)
    assert_close([grad], [expected_grad], atol=5e-5)


def test_all_rows_masked():
    hidden, weight, ref_hidden, ref_weight, _ = make_inputs()
    labels = torch.full((B, T), -100)
    logits = (hidden @ weight.T).requires_grad_()
    stats = chunked_sequence_stats(logits, ref_hidden @ ref_weight.T, labels)
    linear_loss(stats, upstream()).backward()
    assert all((s == 0).all() for s in stats) and (logits.grad == 0).all()
    weight.requires_grad_()
    stats = fused_sequence_stats(hidden, weight, ref_hidden, ref_weight, labels)
    linear_loss(stats, upstream()).backward()
    assert all((s == 0).all() for s in stats) and (weight.grad == 0).all()


def saved_bytes(fn, *args):
    """Bytes autograd keeps for backward, counting each storage once and excluding the inputs' own."""
    inputs = {a.untyped_storage().data_ptr() for a in args if torch.is_tensor(a)}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())


def test_saved_memory_is_per_row_not_per_vocab():
    batch, length, vocab, width = 4, 64, 4096, 16
    g = torch.Generator().manual_seed(9)
    labels = make_labels(g, batch, length, vocab)
    logits = torch.randn(batch, length, vocab, generator=g, requires_grad=True)
    ref_logits = torch.randn(batch, length, vocab, generator=g)
    full = logits.numel() * 4
    naive = saved_bytes(tdpo_get_batch_logps, logits, ref_logits, labels)
    chunked = saved_bytes(chunked_sequence_stats, logits, ref_logits, labels, 32)
    assert naive > 1.5 * full          # the reference keeps float32 (B, T, V) tensors for backward
    assert chunked < 64 * batch * length  # only per-row scalars and indices (a few bytes per row)
    hidden = torch.randn(batch, length, width, generator=g, requires_grad=True)
    weight = torch.randn(vocab, width, generator=g, requires_grad=True)
    fused = saved_bytes(fused_sequence_stats, hidden, weight, hidden.detach() + 1, weight.detach() + 1, labels, 32)
    assert fused < 4 * (2 * batch * length * width + 2 * vocab * width) + 64 * batch * length


def test_hf_model_helpers():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=V, tie_word_embeddings=True)
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(10)
    ids, labels = torch.randint(0, V, (B, T), generator=g), make_labels(g)
    mask = torch.ones_like(ids)
    mask[2, 7:] = 0
    assert token_stats.fused_head_mismatch(policy, ids, mask) is None
    assert token_stats.output_head(policy) is policy.get_input_embeddings().weight  # tied
    w = upstream(11)
    expected = chunked_sequence_stats(policy(input_ids=ids, attention_mask=mask).logits,
                                      reference(input_ids=ids, attention_mask=mask).logits, labels)
    linear_loss(expected, w).backward()
    expected_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    with torch.no_grad():
        ref_hidden = token_stats.final_hidden_states(reference, ids, mask)
    actual = fused_sequence_stats(token_stats.final_hidden_states(policy, ids, mask), token_stats.output_head(policy),
                                  ref_hidden, token_stats.output_head(reference), labels, 5)
    linear_loss(actual, w).backward()
    assert_close([a.detach() for a in actual], [e.detach() for e in expected], atol=1e-4)
    assert_close([p.grad for p in policy.parameters()], expected_grads, atol=1e-5)
    policy.config.final_logit_softcapping = 30.0
    assert token_stats.output_head(policy) is None


def test_fused_stats_place_tensors_of_a_model_split_over_devices(monkeypatch):
    """BasicTrainer on several GPUs splits each model over them (device_map='balanced'): the final
    hidden states come out on the GPU of the last block, while the labels and a tied output layer sit on
    the first, and the reference's layer may sit on yet another. FakeTensorMode pretends numbered devices
    on a CPU (shapes and devices, no values; 'meta:N', since a CPU build of torch cannot index pretended
    CUDA tensors) and raises on any op that mixes two of them, as CUDA does. The forward runs here; values,
    gradients and the backward across devices are tests/test_gpu.py's."""
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode
    hidden, weight, ref_hidden, ref_weight, labels = make_inputs()
    rows, targets, seq = token_stats.response_rows(labels)  # data-dependent (nonzero): on real values, here
    monkeypatch.setattr(token_stats, 'COMPILE', False)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad():  # no autograd: it needs real devices
        fake_rows = [mode.from_tensor(x) for x in (rows, targets, seq)]
        monkeypatch.setattr(token_stats, 'response_rows', lambda l: tuple(x.to(l.device) for x in fake_rows))
        on = lambda x, device: mode.from_tensor(x).to(device)
        policy_head = on(weight, 'meta:0')
        with pytest.raises(FakeTensorDeviceMismatchError):  # what an unplaced projection does
            on(hidden, 'meta:1') @ policy_head.T
        for ref_head_device in ('meta:0', 'meta:2'):
            stats = fused_sequence_stats(on(hidden, 'meta:1'), policy_head, on(ref_hidden, 'meta:1'),
                                         on(ref_weight, ref_head_device), on(labels, 'meta:3'), chunk_rows=4)
            assert [(s.shape, str(s.device)) for s in stats] == [((B,), 'meta:0')] * 3
