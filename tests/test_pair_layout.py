"""pair_layout: the shared and packed layouts against padded.

Without a model: every token lands where padded has it, at the same position, and sees exactly the keys it
sees there (checked against sets built from the padded sequences); the FlexAttention block mask attends as
the explicit mask does. With small random models: logits and gradients equal padded (Llama with SDPA and
with eager attention, GPT-2's learned positions); the CUDA path (registered attention function, block
masks through transformers' FlexAttention) selected and run on CPU with an eager FlexAttention kernel,
generation unchanged; models that cannot take the masks fall back to padded with one message. Through
BasicTrainer on real HH rows: loss, metrics and gradients of TDPO2, TDPO1, DPO, IPO (fused, chunked, naive)
and SFT equal padded. The distributed and `train.py` runs are in tests/test_distributed.py."""
import itertools
import math
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F

import pair_layout
from helpers import CACHE, HH_SAMPLE, make_trainer
from pair_layout import PAIR_LAYOUTS, arrange, dense_mask, unpack
from batches import collate
from preference_datasets import Example


def random_batch(seed=0, n=5, sft=False):
    """A collated batch of n examples with random lengths (one response is a lone EOS)."""
    g = random.Random(seed)
    tokens = lambda k: [g.randrange(1, 100) for _ in range(k)]
    examples = [Example('p', 'c', None if sft else 'r', tokens(g.randint(1, 12)), tokens(1 if i == 1 else g.randint(1, 9)),
                        None if sft else tokens(g.randint(1, 9))) for i in range(n)]
    return collate(examples, pad_token_id=0)


def padded_sequences(batch, sft):
    """(ids, mask, labels) of the padded layout, built here: chosen rows then rejected rows, right-padded."""
    kinds = ('chosen',) if sft else ('chosen', 'rejected')
    length = max(batch[f'{k}_input_ids'].shape[1] for k in kinds)
    pad = lambda x, value: F.pad(x, (0, length - x.shape[1]), value=value)
    return tuple(torch.cat([pad(batch[f'{k}_{key}'], value) for k in kinds])
                 for key, value in (('input_ids', 0), ('attention_mask', 0), ('labels', -100)))


@pytest.mark.parametrize('sft', [False, True], ids=['pairs', 'sft'])
@pytest.mark.parametrize('layout', PAIR_LAYOUTS)
def test_each_token_sits_and_sees_as_in_padded(layout, sft):
    batch = random_batch(seed=1, n=6, sft=sft)
    rows = arrange(batch, layout, row_tokens=24, sft=sft)
    ids, mask, labels = padded_sequences(batch, sft)
    valid = mask.bool()
    assert torch.equal(unpack(rows, rows.input_ids.unsqueeze(-1))[..., 0][valid], ids[valid])
    assert torch.equal(rows.labels, labels)
    slots = set(rows.source[valid].tolist())
    prompts = batch['prompt_attention_mask'].sum(1)
    if layout == 'padded' or (sft and layout == 'shared'):
        assert rows.document is None and len(slots) == int(mask.sum())
        return
    # each prompt is stored once per pair (or example), each response once
    assert len(slots) == int(mask.sum()) - (0 if sft else int(prompts.sum()))
    positions = unpack(rows, rows.position_ids.unsqueeze(-1))[..., 0]
    assert torch.equal(positions[valid], torch.arange(ids.shape[1]).expand_as(ids)[valid])
    allowed = dense_mask(rows)[:, 0].flatten(1)  # (R, L·L) over (query, key) within a row
    length = rows.input_ids.shape[1]
    for s in range(ids.shape[0]):
        for t in range(int(mask[s].sum())):
            query = int(rows.source[s, t])
            row, column = divmod(query, length)
            sees = {row * length + k for k in range(length) if allowed[row, column * length + k]}
            assert sees == set(rows.source[s, :t + 1].tolist()), (layout, s, t)
    if layout == 'packed':
        documents = int(rows.document.max()) + 1
        total = len(slots)
        assert rows.input_ids.shape[0] == min(documents, math.ceil(total / 24))


def check_balanced_rows(lengths, row_tokens):
    """balanced_rows's promises as properties, whatever row gets which index: ceil(total / row_tokens) rows
    (at most one per document), each used; every document exactly once, the documents of a row end to end
    from offset 0; the longest row's length returned; and balance: moving a row's shortest document onto any
    other row never leaves that row shorter than the first was (what placing each document, longest first,
    into the then shortest row guarantees; so the longest row is at most total / rows + its shortest
    document). Returns the rows' contents as a multiset, for comparing placements."""
    rows, offsets, longest = pair_layout.balanced_rows(lengths, row_tokens)
    n_rows = min(len(lengths), math.ceil(sum(lengths) / row_tokens))
    assert len(rows) == len(offsets) == len(lengths)
    assert set(rows) == set(range(n_rows)), (rows, n_rows)
    contents = {row: sorted(n for n, r in zip(lengths, rows) if r == row) for row in range(n_rows)}
    for row in range(n_rows):  # end to end from 0: no document overlaps another or is left out of its row
        spans = sorted((o, o + n) for n, r, o in zip(lengths, rows, offsets) if r == row)
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (row, spans)
    loads = {row: sum(c) for row, c in contents.items()}
    assert longest == max(loads.values())
    for row, c in contents.items():
        for other in loads:
            assert loads[other] + c[0] >= loads[row], (lengths, contents)
    assert longest <= sum(lengths) / n_rows + max(lengths)
    return sorted(map(tuple, contents.values()))


def test_packed_rows_are_balanced():
    lengths = [300, 250, 200, 180, 120, 100, 90, 60]
    placement = check_balanced_rows(lengths, row_tokens=512)  # ceil(1300 / 512) = 3 rows
    # within Graham's bound for longest-first greedy placement, 4/3 - 1/(3·rows) of the best possible longest
    # row, found here by trying all 3^8 placements
    rows, _, longest = pair_layout.balanced_rows(lengths, row_tokens=512)
    best = min(max(sum(n for n, r in zip(lengths, a) if r == row) for row in range(3))
               for a in itertools.product(range(3), repeat=len(lengths)))
    assert best == 440 and longest <= best * (4 / 3 - 1 / 9)
    # the placement does not depend on the documents' order in the batch
    g = random.Random(0)
    for _ in range(5):
        shuffled = g.sample(lengths, len(lengths))
        assert check_balanced_rows(shuffled, row_tokens=512) == placement
    assert pair_layout.balanced_rows([700, 650], row_tokens=512)[0] == [0, 1]  # never more rows than documents
    assert check_balanced_rows([700, 650], row_tokens=512) == [(650,), (700,)]
    assert check_balanced_rows([5], row_tokens=512) == [(5,)]


@pytest.mark.parametrize('seed', range(20))
def test_packed_rows_properties_on_random_lengths(seed):
    g = random.Random(seed)
    lengths = [g.randint(1, 600) for _ in range(g.randint(1, 12))]
    row_tokens = g.choice([64, 300, 512, 2048])
    placement = check_balanced_rows(lengths, row_tokens)
    assert check_balanced_rows(g.sample(lengths, len(lengths)), row_tokens) == placement


def test_block_mask_attends_as_the_dense_mask():
    from torch.nn.attention.flex_attention import flex_attention
    rows = arrange(random_batch(seed=2, n=7), 'packed', row_tokens=40)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows.input_ids.shape[0], 2, rows.input_ids.shape[1], 8, generator=g) for _ in range(3))
    with torch.no_grad():  # eager FlexAttention (CPU, forward only): the reference kernel, no compilation
        flex = flex_attention(q, k, v, block_mask=pair_layout.block_mask(rows))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(rows))
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def tiny_model(kind='llama', attn_implementation='sdpa', vocab=100):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    if kind == 'gpt2':
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab, attn_implementation=attn_implementation,
                                          resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=vocab, attn_implementation=attn_implementation))


def logits_and_grads(model, rows, weights):
    """Padded-order logits of the valid positions, and the gradients of a fixed linear function of them."""
    model.zero_grad()
    logits = unpack(rows, model(**pair_layout.model_inputs(rows, model)).logits)
    valid = rows.source >= 0
    (logits[valid] * weights).sum().backward()
    return logits[valid].detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize('kind,attention', [('llama', 'sdpa'), ('llama', 'eager'), ('gpt2', 'sdpa')])
def test_model_logits_and_gradients_equal_padded(kind, attention):
    model = tiny_model(kind, attention)
    assert pair_layout.prepare_model(model) is None and pair_layout.check_model(model, 100) is None
    batch = random_batch(seed=3, n=5)
    padded = arrange(batch, 'padded', 0)
    weights = torch.randn(int((padded.source >= 0).sum()), 100, generator=torch.Generator().manual_seed(1))
    want_logits, want_grads = logits_and_grads(model, padded, weights)
    for layout in ('shared', 'packed'):
        rows = arrange(batch, layout, row_tokens=30)
        logits, grads = logits_and_grads(model, rows, weights)
        assert list(rows.masks) == [(attention, torch.float32 if attention == 'eager' else None)]  # explicit, on CPU
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
        for name, want in want_grads.items():  # float32 rounding of sums in another order
            torch.testing.assert_close(grads[name], want, rtol=1e-3, atol=1e-5 * float(1 + want.abs().max()))


def test_cuda_path_selected_and_exact(monkeypatch):
    """What runs on CUDA, run on CPU: prepare_model registers the attention function, model_inputs
    builds a BlockMask, transformers' flex_attention_forward computes attention (here with the eager
    FlexAttention kernel instead of the compiled Triton one); logits equal padded; generation is unchanged."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from transformers.integrations import flex_attention as hf_flex
    assert pair_layout.flex_runs(torch.device('cuda')) and not pair_layout.flex_runs(torch.device('cpu'))
    model = tiny_model().eval()
    prompt = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    generate = lambda: model.generate(input_ids=prompt, attention_mask=(prompt != 0).long(), do_sample=False,
                                      max_new_tokens=6, pad_token_id=0)
    before = generate()
    monkeypatch.setattr(pair_layout, 'flex_runs', lambda device: True)
    monkeypatch.setattr(hf_flex, 'compile_friendly_flex_attention',
                        lambda q, k, v, training=False, **kwargs: flex_attention(q, k, v, **kwargs))
    assert pair_layout.prepare_model(model) is None
    assert model.config._attn_implementation == pair_layout.ATTENTION
    batch = random_batch(seed=4, n=4)
    padded, packed = arrange(batch, 'padded', 0), arrange(batch, 'packed', 30)
    with torch.no_grad():
        inputs = pair_layout.model_inputs(packed, model)
        assert isinstance(inputs['attention_mask'], BlockMask)
        want = unpack(padded, model(**pair_layout.model_inputs(padded, model)).logits)
        got = unpack(packed, model(**inputs).logits)
    valid = padded.source >= 0
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert pair_layout.check_model(model, 100) is None
    assert torch.equal(generate(), before)


def test_models_that_cannot_take_the_masks_fall_back_to_padded(tmp_path, capsys, monkeypatch):
    from transformers import AttentionInterface, BloomConfig, BloomForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    bloom = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=4, vocab_size=100))
    assert pair_layout.prepare_model(bloom) == 'BloomForCausalLM.forward takes no position_ids'  # ALiBi from its 2D mask
    flash = tiny_model()
    flash.config._attn_implementation_internal = 'flash_attention_2'
    assert 'takes no custom attention mask' in pair_layout.prepare_model(flash)

    model = tiny_model()
    assert pair_layout.check_model(model, 100) is None

    def causal_only(module, query, key, value, attention_mask, **kwargs):  # an SDPA that ignores custom masks
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    with monkeypatch.context() as patch:
        patch.setitem(AttentionInterface._global_mapping, 'sdpa', causal_only)
        reason = pair_layout.check_model(model, 100)  # only the probe can tell
    assert reason is not None and 'differ from padded' in reason

    trainer = make_trainer(tmp_path, pair_layout='padded')
    capsys.readouterr()
    trainer.reference_model = bloom
    assert trainer.choose_pair_layout('packed') == 'padded'
    assert capsys.readouterr().out == ("pair_layout=packed: BloomForCausalLM.forward takes no position_ids; "
                                       "using 'padded'\n")


# ---- through the trainer, on real HH rows -----------------------------------------------------

LOSSES = {'tdpo2': ('tdpo', {}), 'tdpo1': ('tdpo', {'loss.if_tdpo2': 'false'}), 'dpo': ('dpo', {}), 'ipo': ('ipo', {})}


def hh_trainer(tmp_path, loss, **overrides):
    if not os.path.exists(HH_SAMPLE):
        pytest.skip(f'real hh-rlhf sample not found at {os.path.normpath(HH_SAMPLE)}')
    settings = dict(datasets=f'[{HH_SAMPLE}]', max_length=512, max_prompt_length=256, batch_size=6, n_examples=6,
                    eval_fraction=0.05)
    settings.update(overrides)
    return make_trainer(tmp_path, loss=loss, **settings)


def step_results(trainer, layout):
    """Loss, metrics and policy gradients of one training batch with `layout`."""
    trainer.pair_layout = trainer.choose_pair_layout(layout)
    assert trainer.pair_layout == layout
    batch = next(iter(trainer.train_batches()))
    trainer.policy.zero_grad()
    loss, metrics = trainer.get_batch_metrics(batch, train=True)
    loss.backward()
    return loss.item(), metrics, {n: p.grad.clone() for n, p in trainer.policy.named_parameters()}


def assert_same_step(got, want, metric_tol=1e-4):
    (loss, metrics, grads), (want_loss, want_metrics, want_grads) = got, want
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert set(metrics) == set(want_metrics)
    for key in want_metrics:
        torch.testing.assert_close(torch.tensor(metrics[key]), torch.tensor(want_metrics[key]), rtol=metric_tol, atol=metric_tol)
    assert max(g.abs().max() for g in want_grads.values()) > 1e-3  # the comparison is not vacuous
    for name, want in want_grads.items():  # float32 rounding: relative to each tensor's scale
        torch.testing.assert_close(grads[name], want, rtol=1e-3, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize('loss', list(LOSSES))
def test_layouts_equal_padded_on_hh_rows(tmp_path, loss):
    name, overrides = LOSSES[loss]
    trainer = hh_trainer(tmp_path, name, **overrides)
    padded = step_results(trainer, 'padded')
    for layout in ('shared', 'packed'):
        assert_same_step(step_results(trainer, layout), padded)


@pytest.mark.parametrize('stats_impl', ['chunked', 'naive'])
def test_layouts_equal_padded_with_logit_statistics(tmp_path, stats_impl):
    trainer = hh_trainer(tmp_path, 'tdpo', stats_impl=stats_impl, batch_size=2, n_examples=2)
    padded = step_results(trainer, 'padded')
    for layout in ('shared', 'packed'):
        assert_same_step(step_results(trainer, layout), padded)


def test_sft_packing_equals_padded(tmp_path):
    trainer = hh_trainer(tmp_path, 'sft')
    padded = step_results(trainer, 'padded')
    assert_same_step(step_results(trainer, 'packed'), padded)


def test_policy_equal_to_reference_gives_zero_kl_and_log_2_packed(tmp_path):
    trainer = hh_trainer(tmp_path, 'tdpo', pair_layout='packed')
    trainer.policy.load_state_dict(trainer.reference_model.state_dict())
    batch = next(iter(trainer.train_batches()))
    with torch.no_grad():
        loss, metrics = trainer.get_batch_metrics(batch, train=False)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    assert max(abs(v) for v in metrics['kl_eval/chosen'] + metrics['kl_eval/rejected']) < 1e-4


def test_train_py_and_distributed_trainers_equal_padded(tmp_path):
    """`python train.py` with pair_layout=packed, FSDPTrainer (fused statistics, packed) and
    TensorParallelTrainer (shared) under torchrun with 2 CPU processes log the same losses and metrics
    and end with the same weights as BasicTrainer with pair_layout=padded, on real HH rows."""
    from test_distributed import TORCHRUN, assert_same_run, read_metrics, run
    if not os.path.exists(HH_SAMPLE):
        pytest.skip(f'real hh-rlhf sample not found at {os.path.normpath(HH_SAMPLE)}')
    args = ['model=tiny', f'local_dirs=[{CACHE}]', f'datasets=[{HH_SAMPLE}]', 'loss=tdpo', 'batch_size=4',
            'eval_batch_size=4', 'max_length=512', 'max_prompt_length=256', 'n_eval_examples=8', 'optimizer=SGD',
            'lr=1e-2', 'warmup_steps=0', 'n_examples=8', 'eval_every=8', 'minimum_log_interval_secs=0',
            'wandb.enabled=false', 'sample_during_eval=false']
    runs = {}
    for name, launcher, extra in (('padded', [sys.executable], ['pair_layout=padded']),
                                  ('packed', [sys.executable], ['pair_layout=packed']),
                                  ('fsdp_packed', TORCHRUN, ['pair_layout=packed', 'trainer=FSDPTrainer']),
                                  ('tp_shared', TORCHRUN, ['pair_layout=shared', 'trainer=TensorParallelTrainer'])):
        runs[name] = str(tmp_path / name)
        distributed = launcher is TORCHRUN
        out = run(launcher, [*args, *extra, f'exp_name={name}', f'local_run_dir={runs[name]}',
                             *(['gradient_accumulation_steps=2'] if distributed else [])])
        assert "using 'padded'" not in out and "using 'chunked'" not in out, out[-3000:]
    assert [m['split'] for m in read_metrics(runs['padded'])] == ['eval', 'train', 'train', 'eval']
    for name in ('packed', 'fsdp_packed', 'tp_shared'):
        assert_same_run(runs['padded'], runs[name])
