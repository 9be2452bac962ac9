"""Pair layouts: how a batch of preference pairs is laid out for one forward pass.

`padded` (the reference's layout) runs chosen and rejected as 2B sequences, each prompt + response,
right-padded to the longest: every prompt is computed twice, plus the padding. `shared` runs one
sequence per pair, prompt + chosen + rejected (prefix sharing, Wang & Hegde 2024, arXiv 2410.20305),
and `packed` puts those shared sequences (for SFT: prompt + response) side by side in a few rows of
nearly equal length. Results equal `padded` to float rounding because every token sees exactly the
keys it sees there, at the same positions:
  - position ids restart for each response: the rejected response's positions continue from the
    prompt's end as if chosen were absent, so rotary (or learned) position embeddings are the same;
  - the attention mask lets a token see earlier tokens of its own document (one pair or one SFT
    example), except that a response never sees the other response.
A `Layout` keeps, for each padded sequence s and position t, where that token sits in the rows
(`source`), so outputs map back: `response_rows` gives the rows that predict each response token (for
the chunked and fused statistics), `unpack` rebuilds the padded (S, T, ...) tensor (for naive ones).

The mask is a FlexAttention BlockMask on CUDA (blocks in which no token may attend are skipped),
else an explicit (R, 1, L, L) mask for SDPA (boolean) or eager attention (additive). On CUDA an SDPA
model gets a registered attention function that sends BlockMasks to FlexAttention and everything
else to SDPA, so generation is unchanged. Not on CPU: there torch 2.13's FlexAttention has no
backward, and compiling its forward took 20-40 s per new shape on 2 cores and failed for some shapes
(a C++ error in the generated kernel), for a few percent of a step.
"""
import inspect
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

import lora
import token_stats
import utils

PAIR_LAYOUTS = ('padded', 'shared', 'packed')
# FlexAttention block masks on CUDA; PAIR_LAYOUT_FLEX=0 uses explicit SDPA masks there too
FLEX = os.environ.get('PAIR_LAYOUT_FLEX', '1') != '0'
ATTENTION = 'pair_layout_sdpa'  # the registered attention function: BlockMask -> FlexAttention, else SDPA


def concatenated_inputs(batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Stack chosen (first B rows) and rejected (last B rows), right-padded to one length, so that
    policy and reference each see both in a single forward pass (the padded layout)."""
    length = max(batch['chosen_input_ids'].shape[1], batch['rejected_input_ids'].shape[1])
    out = {}
    for key, pad in (('input_ids', 0), ('attention_mask', 0), ('labels', -100)):
        out[f'concatenated_{key}'] = torch.cat([utils.pad_to_length(batch[f'chosen_{key}'], length, pad),
                                                utils.pad_to_length(batch[f'rejected_{key}'], length, pad)])
    return out


@dataclass
class Layout:
    """One forward pass's rows for S padded sequences of length T (S = 2B for pairs: chosen, then
    rejected; S = B for SFT), laid out in R rows of length L."""
    input_ids: Tensor                # (R, L)
    attention_mask: Optional[Tensor]  # (R, L) padding mask, padded layout only (the model builds the causal mask)
    position_ids: Optional[Tensor]   # (R, L); None in the padded layout (the model counts 0, 1, ...)
    document: Optional[Tensor]       # (R, L) pair (or example) of each token, -1 on padding; None when padded
    branch: Optional[Tensor]         # (R, L) 0 prompt, 1 chosen (or SFT response), 2 rejected; None when padded
    source: Tensor                   # (S, T) flat index into R·L of sequence s's token t; -1 past its end
    labels: Tensor                   # (S, T) the padded layout's labels (-100 on prompt and padding)
    masks: Dict = field(default_factory=dict)  # attention masks built so far, by kind and dtype

    @property
    def n_sequences(self) -> int:
        return self.source.shape[0]


def _padded_sequences(batch: Dict, sft: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if sft:
        return batch['chosen_input_ids'], batch['chosen_attention_mask'], batch['chosen_labels']
    inputs = concatenated_inputs(batch)
    return tuple(inputs[f'concatenated_{k}'] for k in ('input_ids', 'attention_mask', 'labels'))


def balanced_rows(lengths: List[int], row_tokens: int) -> Tuple[List[int], List[int], int]:
    """Place documents of `lengths` tokens in ceil(total / row_tokens) rows (at most one per document),
    longest first, each into the currently shortest row, so that rows come out nearly equal and
    padding to the longest row is small. Returns (row of each document, its offset in the row, the
    longest row's length)."""
    n_rows = min(len(lengths), max(1, -(-sum(lengths) // max(1, row_tokens))))
    loads, rows, offsets = [0] * n_rows, [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = min(range(n_rows), key=loads.__getitem__)
        rows[i], offsets[i] = row, loads[row]
        loads[row] += lengths[i]
    return rows, offsets, max(loads)


def arrange(batch: Dict, layout: str, row_tokens: int, sft: bool = False) -> Layout:
    """The rows of one batch (a collated dict; its prompt_attention_mask gives prompt lengths) in `layout`.
    row_tokens: the packed layout's target row length (rows = ceil(tokens / row_tokens)). SFT has one
    response per prompt, so `shared` is `padded` there."""
    if layout not in PAIR_LAYOUTS:
        raise ValueError(f'pair_layout={layout!r}; valid: {", ".join(PAIR_LAYOUTS)}')
    ids, mask, labels = _padded_sequences(batch, sft)
    n_seq, length = ids.shape
    if layout == 'padded' or (sft and layout == 'shared'):
        source = torch.arange(n_seq * length, device=ids.device).view(n_seq, length)
        return Layout(ids, mask, None, None, None, source.masked_fill(mask == 0, -1), labels)
    n_docs = batch['prompt_attention_mask'].shape[0]
    responses = n_seq // n_docs                           # 2 for pairs, 1 for SFT
    seq_lengths = mask.sum(1)                             # (S,) prompt + response
    prompt = batch['prompt_attention_mask'].sum(1).to(ids.device).repeat(responses)  # (S,)
    response = (seq_lengths - prompt).view(responses, n_docs)
    doc_lengths = (prompt[:n_docs] + response.sum(0)).tolist()
    if layout == 'shared':
        rows, offsets, row_length = list(range(n_docs)), [0] * n_docs, max(doc_lengths)
    else:
        rows, offsets, row_length = balanced_rows(doc_lengths, row_tokens)
    doc = torch.arange(n_seq, device=ids.device) % n_docs
    which = torch.arange(n_seq, device=ids.device) // n_docs  # 0 chosen, 1 rejected
    start = (torch.tensor(rows, device=ids.device) * row_length + torch.tensor(offsets, device=ids.device))[doc]
    skip = (response.cumsum(0) - response).flatten()     # tokens of the doc's earlier responses
    t = torch.arange(length, device=ids.device)
    in_response = t >= prompt[:, None]
    source = start[:, None] + t + torch.where(in_response, skip[:, None], 0)
    source = source.masked_fill(t >= seq_lengths[:, None], -1)

    valid = source >= 0
    where = source[valid]
    size = (max(rows) + 1) * row_length

    def scatter(values: Tensor, fill: int) -> Tensor:
        out = torch.full((size,), fill, dtype=torch.long, device=ids.device)
        out[where] = values.expand(n_seq, length)[valid]  # prompt tokens are written once per response, equally
        return out.view(-1, row_length)

    branch = torch.where(in_response, which[:, None] + 1, 0)
    return Layout(scatter(ids, 0), None, scatter(t, 0), scatter(doc[:, None], -1), scatter(branch, 0),
                  source, labels)


def response_rows(layout: Layout) -> Tuple[Tensor, Tensor, Tensor]:
    """(rows (N,) flat indices into the layout's R·L outputs of the positions that predict a response
    token, targets (N,) those tokens, seq (N,) their sequence), in the padded layout's order."""
    rows, targets, seq = token_stats.response_rows(layout.labels)
    return layout.source.flatten()[rows], targets, seq


def unpack(layout: Layout, outputs: Tensor) -> Tensor:
    """Outputs (R, L, ...) -> the padded layout's (S, T, ...); positions past a sequence's end hold
    another token's output (its labels are -100 there)."""
    if layout.document is None:
        return outputs
    return outputs.flatten(0, 1)[layout.source.clamp(min=0)]


# ---- attention masks ---------------------------------------------------------------------------

def visible(doc_q: Tensor, doc_k: Tensor, branch_q: Tensor, branch_k: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """Whether query token q may attend to key token k: same document, not later, and the key is
    prompt or in the query's own response. (Padding is document -1: it sees earlier padding.)"""
    return (doc_q == doc_k) & (k <= q) & ((branch_k == 0) | (branch_k == branch_q))


def dense_mask(layout: Layout) -> Tensor:
    """(R, 1, L, L) boolean, True where attention is allowed."""
    doc, branch = layout.document, layout.branch
    positions = torch.arange(doc.shape[1], device=doc.device)
    return visible(doc[:, :, None], doc[:, None, :], branch[:, :, None], branch[:, None, :],
                   positions[:, None], positions[None, :])[:, None]


def block_mask(layout: Layout):
    """The same mask as a FlexAttention BlockMask (blocks no token of which may attend are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask
    doc, branch = layout.document, layout.branch

    def mask_mod(b, h, q, k):
        return visible(doc[b, q], doc[b, k], branch[b, q], branch[b, k], q, k)
    rows, length = doc.shape
    return create_block_mask(mask_mod, rows, None, length, length, device=doc.device)


def flex_runs(device: torch.device) -> bool:
    """Whether FlexAttention trains on `device`: in torch 2.13 on CUDA (Triton kernels, forward and
    backward); not on CPU (no backward; see the module's docstring)."""
    return FLEX and device.type == 'cuda'


def attention_kind(model) -> str:
    """How `model` takes a custom mask: 'flex' (a BlockMask: CUDA, see prepare_model), 'sdpa'
    (boolean) or 'eager' (additive)."""
    implementation = model.config._attn_implementation
    dropout = model.training and getattr(model.config, 'attention_dropout', 0.0)  # FlexAttention has none
    if implementation in (ATTENTION, 'flex_attention') and FLEX and not dropout:
        return 'flex'
    return 'eager' if implementation == 'eager' else 'sdpa'


def model_inputs(layout: Layout, model) -> Dict:
    """Keyword arguments of `model(...)` (a Hugging Face causal LM) for this layout."""
    if layout.document is None:
        return {'input_ids': layout.input_ids, 'attention_mask': layout.attention_mask}
    kind = attention_kind(model)
    dtype = model.get_input_embeddings().weight.dtype
    key = (kind, dtype if kind == 'eager' else None)
    if key not in layout.masks:
        if kind == 'flex':
            layout.masks[key] = block_mask(layout)
        elif kind == 'eager':
            layout.masks[key] = torch.zeros((), dtype=dtype, device=layout.document.device).masked_fill(
                ~dense_mask(layout), torch.finfo(dtype).min)
        else:
            layout.masks[key] = dense_mask(layout)
    return {'input_ids': layout.input_ids, 'position_ids': layout.position_ids, 'attention_mask': layout.masks[key]}


def _attention(module, query, key, value, attention_mask, **kwargs):
    """Registered as ATTENTION: FlexAttention for a BlockMask, SDPA for anything else (generation's
    masks, explicit masks). If FlexAttention fails (no compiler, no Triton), it is turned off with a
    warning and this call recomputes its mask densely for SDPA."""
    from torch.nn.attention.flex_attention import BlockMask, create_mask
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    global FLEX
    if isinstance(attention_mask, BlockMask):
        if FLEX:
            from transformers.integrations.flex_attention import flex_attention_forward
            try:
                return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
            except Exception as error:  # compilation problems surface here, at the first call
                warnings.warn(f'pair_layout: FlexAttention failed ({type(error).__name__}: {error}); using SDPA masks')
                FLEX = False
        rows, length = attention_mask.shape[0], query.shape[2]
        attention_mask = create_mask(attention_mask.mask_mod, rows, None, length, length, device=query.device)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def prepare_model(model) -> Optional[str]:
    """Let `model` take this module's masks and position ids; returns None, or why it cannot (then use
    'padded'). An SDPA model on CUDA that supports FlexAttention gets the ATTENTION function (SDPA
    except for BlockMasks); otherwise SDPA, eager and flex_attention models take masks as they are."""
    model = lora.base_model(model)  # a LoRA policy passes the keywords on to its transformers model
    name = type(model).__name__
    if 'position_ids' not in inspect.signature(model.forward).parameters:
        return f'{name}.forward takes no position_ids'
    implementation = model.config._attn_implementation
    device = model.get_input_embeddings().weight.device
    if implementation == 'sdpa' and flex_runs(device) and getattr(model, '_supports_flex_attn', False):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(ATTENTION, _attention)
        AttentionMaskInterface.register(ATTENTION, sdpa_mask)
        model.set_attn_implementation(ATTENTION)
    elif implementation not in (ATTENTION, 'sdpa', 'eager', 'flex_attention'):
        return f'{name} uses attn_implementation={implementation!r}, which takes no custom attention mask'
    return None


@torch.no_grad()
def check_model(model, vocab_size: int) -> Optional[str]:
    """None if `model`'s logits in the shared layout equal its padded ones on a small probe batch (two
    pairs of random tokens), else why not: the model ignores custom 4D masks or position ids, or
    fails on them. Every rank of a distributed model must call it (same probe on all)."""
    g = torch.Generator().manual_seed(0)
    device = model.get_input_embeddings().weight.device
    batch = _probe_batch(g, vocab_size, device)
    try:
        logits = {}
        for layout in ('padded', 'shared'):
            rows = arrange(batch, layout, row_tokens=64)
            logits[layout] = (rows, unpack(rows, model(**model_inputs(rows, model), use_cache=False).logits.float()))
    except Exception as error:  # e.g. a model whose attention cannot broadcast a 4D mask
        return f'{type(model).__name__} fails with a custom attention mask ({type(error).__name__}: {error})'
    (rows, padded), (_, shared) = logits['padded'], logits['shared']
    valid = rows.source >= 0
    difference = (padded[valid] - shared[valid]).abs().max().item()
    scale = padded[valid].abs().max().item()
    tolerance = 1e-4 if model.get_input_embeddings().weight.dtype == torch.float32 else 2e-2
    if not difference <= tolerance * (1 + scale):
        return (f"{type(model).__name__}'s logits in the shared layout differ from padded by {difference:.3g}: "
                f'it does not apply custom 4D attention masks or position ids')
    return None


def _probe_batch(g: torch.Generator, vocab_size: int, device) -> Dict[str, Tensor]:
    """Two pairs with prompts of 5 and 3 tokens and responses of different lengths, collated."""
    prompts = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (5, 3)]
    chosen = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (3, 4)]
    rejected = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (4, 2)]
    batch = {'prompt_attention_mask': torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])}  # left-padded, as collated
    for kind, responses in (('chosen', chosen), ('rejected', rejected)):
        seqs = [p + r for p, r in zip(prompts, responses)]
        longest = max(map(len, seqs))
        batch[f'{kind}_input_ids'] = torch.tensor([s + [0] * (longest - len(s)) for s in seqs])
        batch[f'{kind}_attention_mask'] = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs])
        batch[f'{kind}_labels'] = torch.tensor([[-100] * len(p) + r + [-100] * (longest - len(p) - len(r))
                                                for p, r in zip(prompts, responses)])
    return {k: v.to(device) for k, v in batch.items()}
