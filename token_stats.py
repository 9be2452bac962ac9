"""Memory-bounded, exact TDPO per-sequence statistics.

The reference implementation (`losses.tdpo_get_batch_logps`) materialises, in float32, the
policy log-softmax, the reference softmax, its log, their difference and their product over the
whole (B, T, V) tensor. Here only response rows (labels != -100 after the shift) are touched, in
chunks of `chunk_rows` rows, and every (rows × V) intermediate dies with its chunk.

Notation for one response position (a row): z (V,) policy logits, r (V,) reference logits,
y the taken token, lse = logsumexp, p = softmax(z), q = softmax(r). Then
    log πθ(y)          = z_y − lse(z)
    log πθ(y) − log π_ref(y) = (z_y − lse(z)) − (r_y − lse(r))
    KL(q ‖ p)          = Σ_v q_v (r_v − z_v) + lse(z) − lse(r)          (one temporary, not five)
and the gradients with respect to z, given per-sequence upstream gradients g_margin, g_kl, g_logps,
a = g_margin + g_logps and k = g_kl (indexed by the row's sequence), are
    ∂/∂z = a·(onehot(y) − p) + k·(p − q) = a·onehot(y) − (a − k)·p − k·q.
Both autograd functions save only per-row scalars (lse(z), lse(r)) and recompute p and q, chunk by
chunk, in backward. `fused_sequence_stats` additionally never builds logits: it recomputes
z = h Wᵀ and r = h_ref W_refᵀ per chunk, and returns ∂/∂h = G W and ∂/∂W = Gᵀ h.

A model split over several GPUs (device_map='balanced') leaves its final hidden states on the GPU of
its last block, while a tied output layer sits with the input embedding on the first: the fused path
computes on the output layer's device, moving only the response rows there.
"""
import os
import warnings
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

STATS_IMPLS = ('naive', 'chunked', 'fused')
_CHUNK_BYTES = 32 * 2 ** 20  # target size of one float32 (rows × V) temporary


def _auto_chunk_rows(vocab: int, chunk_rows: Optional[int]) -> int:
    return chunk_rows if chunk_rows else max(8, _CHUNK_BYTES // (4 * vocab))


def response_rows(labels: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """labels (B, T) -> (rows (N,) flat indices into the (B·T) positions whose logits predict a
    response token, targets (N,) the tokens they predict, seq (N,) the sequence of each row)."""
    batch, length = labels.shape
    mask = labels[:, 1:] != -100
    seq, pos = mask.nonzero(as_tuple=True)
    return seq * length + pos, labels[seq, pos + 1], seq


def _chunk_stats(z: Tensor, r: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """z, r (c, V) any float dtype -> (KL(q‖p), lse(z), lse(r)), each float32 (c,).
    With e = exp(r − max r): KL = Σ e·(r − z) / Σ e + lse(z) − lse(r), so one pass over r shares
    its exponentials between lse(r) and the KL sum, and no (c, V) tensor has to be kept."""
    z, r = z.float(), r.float()
    max_z, max_r = z.amax(-1, keepdim=True), r.amax(-1, keepdim=True)
    e = torch.exp(r - max_r)
    sum_e, dot = e.sum(-1), (e * (r - z)).sum(-1)
    lse_z = max_z.squeeze(-1) + torch.exp(z - max_z).sum(-1).log()
    lse_r = max_r.squeeze(-1) + sum_e.log()
    return dot / sum_e + lse_z - lse_r, lse_z, lse_r


def _chunk_grad(z: Tensor, r: Tensor, y: Tensor, lse_z: Tensor, lse_r: Tensor, a: Tensor, k: Tensor,
                dtype: torch.dtype) -> Tensor:
    """∂/∂z = a·onehot(y) − (a − k)·p − k·q for one chunk, computed in float32, returned (c, V) in `dtype`."""
    z, r = z.float(), r.float()
    a, k = a.unsqueeze(-1), k.unsqueeze(-1)
    onehot = torch.arange(z.shape[-1], device=z.device) == y.unsqueeze(-1)
    grad = (k - a) * torch.exp(z - lse_z.unsqueeze(-1)) - k * torch.exp(r - lse_r.unsqueeze(-1))
    return torch.where(onehot, grad + a, grad).to(dtype)


# The per-chunk math under torch.compile (one fused loop per pass instead of ~8 eager kernels with
# (c, V) temporaries; ~5x faster on CPU). Same equations; the results differ from eager by
# float rounding only. Any failure to compile falls back to eager for the rest of the process.
COMPILE = os.environ.get('TOKEN_STATS_COMPILE', '1') != '0'
_compiled = {}


def _run(fn, *args):
    global COMPILE
    if COMPILE:
        try:
            if fn not in _compiled:
                _compiled[fn] = torch.compile(fn, dynamic=True)
            return _compiled[fn](*args)
        except Exception as error:  # no C++ compiler / triton, unsupported backend, ...
            warnings.warn(f'token_stats: torch.compile failed ({type(error).__name__}: {error}); using eager')
            COMPILE = False
    return fn(*args)


def _gather_targets(logits: Tensor, rows: Tensor, targets: Tensor) -> Tensor:
    """logits (R, V), rows, targets (N,) -> logits[rows, targets] as float32 (N,)."""
    return logits[rows, targets].float()


def _sequence_sums(batch: int, seq: Tensor, *per_row: Tensor) -> Tuple[Tensor, ...]:
    return tuple(torch.zeros(batch, device=seq.device).index_add_(0, seq, v) for v in per_row)


def _row_coefficients(seq: Tensor, batch: int, g_margin, g_kl, g_logps) -> Tuple[Tensor, Tensor]:
    """Upstream (B,) gradients -> per-row a = g_margin + g_logps and k = g_kl, float32 (N,)."""
    zero = torch.zeros(batch, device=seq.device)
    g_margin, g_kl, g_logps = (zero if g is None else g.float() for g in (g_margin, g_kl, g_logps))
    return (g_margin + g_logps)[seq], g_kl[seq]


class _ChunkedStats(torch.autograd.Function):
    """(logits (R, V), reference (R, V), rows, targets, seq (N,), batch, chunk) -> 3 × (B,)."""

    @staticmethod
    def forward(ctx, logits, reference, rows, targets, seq, batch, chunk):
        kl, lse_z, lse_r = (torch.empty(rows.numel(), device=logits.device) for _ in range(3))
        for s in range(0, rows.numel(), chunk):
            idx, c = rows[s:s + chunk], slice(s, s + chunk)
            kl[c], lse_z[c], lse_r[c] = _run(_chunk_stats, logits[idx], reference[idx])
        logp = _gather_targets(logits, rows, targets) - lse_z
        ref_logp = _gather_targets(reference, rows, targets) - lse_r
        ctx.save_for_backward(logits, reference, rows, targets, seq, lse_z, lse_r)
        ctx.batch, ctx.chunk = batch, chunk
        return _sequence_sums(batch, seq, logp - ref_logp, kl, logp)

    @staticmethod
    def backward(ctx, g_margin, g_kl, g_logps):
        logits, reference, rows, targets, seq, lse_z, lse_r = ctx.saved_tensors
        a, k = _row_coefficients(seq, ctx.batch, g_margin, g_kl, g_logps)
        grad = torch.zeros_like(logits)
        for s in range(0, rows.numel(), ctx.chunk):
            idx, c = rows[s:s + ctx.chunk], slice(s, s + ctx.chunk)
            # index_add_, not assignment: in a shared layout one position can predict two responses' tokens
            grad.index_add_(0, idx, _run(_chunk_grad, logits[idx], reference[idx], targets[c], lse_z[c], lse_r[c],
                                         a[c], k[c], grad.dtype))
        return grad, None, None, None, None, None, None


def chunked_sequence_stats(logits: Tensor, reference_logits: Tensor, labels: Tensor,
                           chunk_rows: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Same inputs, outputs and semantics as `losses.tdpo_get_batch_logps(..., average_log_prob=False)`.

    logits, reference_logits (B, T, V), any float dtype; labels (B, T) with -100 on prompt/padding.
    Returns float32 (B,) (logps_margin, position_kl, logps); gradients flow into `logits` only.
    Extra memory: a few (chunk_rows × V) float32 temporaries (chunk_rows=None: ~32 MiB each), plus
    the (B, T, V) gradient of `logits` in backward, which any loss on full logits needs.
    """
    assert logits.shape == reference_logits.shape and logits.shape[:-1] == labels.shape
    batch, length, vocab = logits.shape
    return chunked_row_stats(logits.reshape(batch * length, vocab), reference_logits.reshape(batch * length, vocab),
                             *response_rows(labels), batch, chunk_rows)


def chunked_row_stats(logits: Tensor, reference_logits: Tensor, rows: Tensor, targets: Tensor, seq: Tensor,
                      n_sequences: int, chunk_rows: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """`chunked_sequence_stats` on flattened positions: logits, reference_logits (M, V); rows (N,) the
    positions that predict a response token, targets (N,) those tokens, seq (N,) their sequence (any
    layout of the sequences: see pair_layout.response_rows). Returns float32 (n_sequences,) × 3."""
    return _ChunkedStats.apply(logits, reference_logits.detach(), rows, targets, seq, n_sequences,
                               _auto_chunk_rows(logits.shape[-1], chunk_rows))


def _project(h: Tensor, weight: Tensor, ref_h: Tensor, ref_weight: Tensor) -> Tuple[Tensor, Tensor]:
    """One chunk's logits z = h Wᵀ and reference logits r = h_ref W_refᵀ, each computed where its output
    layer is (h on W's device, h_ref on W_ref's), both returned on W's device."""
    return h @ weight.T, (ref_h @ ref_weight.T).to(weight.device)


class _FusedStats(torch.autograd.Function):
    """(h (N, H), W (V, H), h_ref (N, H), W_ref (V, H), targets, seq (N,), batch, chunk) -> 3 × (B,)."""

    @staticmethod
    def forward(ctx, h, weight, ref_h, ref_weight, targets, seq, batch, chunk):
        n = h.shape[0]
        kl, lse_z, lse_r, zy, ry = (torch.empty(n, device=h.device) for _ in range(5))
        for s in range(0, n, chunk):
            c = slice(s, s + chunk)
            z, r = _project(h[c], weight, ref_h[c], ref_weight)
            kl[c], lse_z[c], lse_r[c] = _run(_chunk_stats, z, r)
            zy[c], ry[c] = (x.gather(-1, targets[c].unsqueeze(-1)).view(-1) for x in (z, r))
        ctx.save_for_backward(h, weight, ref_h, ref_weight, targets, seq, lse_z, lse_r)
        ctx.batch, ctx.chunk = batch, chunk
        logp = zy - lse_z
        return _sequence_sums(batch, seq, logp - (ry - lse_r), kl, logp)

    @staticmethod
    def backward(ctx, g_margin, g_kl, g_logps):
        h, weight, ref_h, ref_weight, targets, seq, lse_z, lse_r = ctx.saved_tensors
        a, k = _row_coefficients(seq, ctx.batch, g_margin, g_kl, g_logps)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device) if need_w else None  # float32 sum
        for s in range(0, h.shape[0], ctx.chunk):
            c = slice(s, s + ctx.chunk)
            z, r = _project(h[c], weight, ref_h[c], ref_weight)
            g = _run(_chunk_grad, z, r, targets[c], lse_z[c], lse_r[c], a[c], k[c], weight.dtype)
            if need_h:
                grad_h[c] = g @ weight
            if need_w:
                if g.dtype == torch.float32:
                    grad_w.addmm_(g.T, h[c])
                else:
                    grad_w += (g.T @ h[c]).float()
        return grad_h, grad_w.to(weight.dtype) if need_w else None, None, None, None, None, None, None


def fused_sequence_stats(hidden: Tensor, weight: Tensor, reference_hidden: Tensor, reference_weight: Tensor,
                         labels: Tensor, chunk_rows: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """`chunked_sequence_stats(hidden @ weight.T, reference_hidden @ reference_weight.T, labels)`
    without ever building the (B, T, V) logits.

    hidden, reference_hidden (B, T, H): final hidden states (after the final norm) of policy and
    reference; weight, reference_weight (V, H): bias-free output embeddings (may be tied to the input
    embedding). Only response rows are projected. Gradients flow into `hidden` and `weight`; the
    reference gets none. Backward recomputes both projections chunk by chunk (2 extra N×V×H matmuls).
    The tensors may sit on different devices (a model split over GPUs): the statistics are computed on
    `weight`'s device, the reference's projection on `reference_weight`'s.
    Returns float32 (B,) (logps_margin, position_kl, logps), on `weight`'s device.
    """
    assert hidden.shape == reference_hidden.shape and hidden.shape[:-1] == labels.shape
    batch, length, width = hidden.shape
    return fused_row_stats(hidden.reshape(batch * length, width), weight, reference_hidden.reshape(batch * length, width),
                           reference_weight, *response_rows(labels), batch, chunk_rows)


def fused_row_stats(hidden: Tensor, weight: Tensor, reference_hidden: Tensor, reference_weight: Tensor, rows: Tensor,
                    targets: Tensor, seq: Tensor, n_sequences: int, chunk_rows: Optional[int] = None
                    ) -> Tuple[Tensor, Tensor, Tensor]:
    """`fused_sequence_stats` on flattened positions: hidden, reference_hidden (M, H); rows, targets,
    seq (N,) as in `chunked_row_stats`. Only the N rows are projected: gathered where each model left
    its hidden states, and only those moved to its output layer's device (differentiably)."""
    device = weight.device
    h = hidden.index_select(0, rows.to(hidden.device)).to(device)
    ref_h = reference_hidden.detach().index_select(0, rows.to(reference_hidden.device)).to(reference_weight.device)
    return _FusedStats.apply(h, weight, ref_h, reference_weight.detach(), targets.to(device), seq.to(device), n_sequences,
                             _auto_chunk_rows(weight.shape[0], chunk_rows))


def output_head(model: nn.Module) -> Optional[Tensor]:
    """The (V, H) weight of a HF causal LM's output layer if logits are exactly
    `final_hidden_states(...) @ weight.T` (a bias-free nn.Linear, no logit scale or soft-capping in
    the config), else None: then use 'chunked'. Unknown architectures with custom scaling in their
    forward are not detectable from the config; `fused_head_mismatch` verifies numerically."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    if head.weight.device.type == 'meta':  # offloaded (accelerate, device_map with 'cpu'/'disk' entries):
        return None                        # the real weight exists only inside the model's forward
    config = model.config.get_text_config() if hasattr(model.config, 'get_text_config') else model.config
    if getattr(config, 'final_logit_softcapping', None) or getattr(config, 'attn_logit_softcapping_final', None):
        return None
    for name in ('logit_scale', 'logits_scaling', 'output_logit_scale', 'mup_width_multiplier'):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return None
    return head.weight


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                        position_ids: Optional[Tensor] = None) -> Tensor:
    """(B, T, H) hidden states that a HF causal LM feeds into its lm_head (final norm applied), on the
    device of the model's last block (not necessarily the output layer's: see fused_sequence_stats)."""
    decoder = model.get_decoder() if hasattr(model, 'get_decoder') else model.base_model
    return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).last_hidden_state


CHECK_SEQUENCES, CHECK_TOKENS = 2, 64  # what fused_head_mismatch compares: first tokens of the first sequences


@torch.no_grad()
def fused_head_mismatch(model: nn.Module, input_ids: Tensor, attention_mask: Tensor,
                        hidden_states: Optional[Callable[[nn.Module, Dict], Tensor]] = None) -> Optional[str]:
    """None if the model's own logits equal `hidden_states(model, inputs) @ output_head(model).T` (the
    trainer's hook; default final_hidden_states), to the rounding of the logits' dtype, on the first
    CHECK_TOKENS tokens of the first CHECK_SEQUENCES rows of input_ids (B, T) (causal: those logits depend
    on nothing later); else one line saying how they differ. A forward that scales or caps its logits
    outside the config names `output_head` knows would otherwise get wrong fused statistics, silently."""
    if output_head(model) is None:
        return "the output layer is not a bias-free linear map on a device"
    hidden_states = hidden_states or (lambda m, inputs: final_hidden_states(m, **inputs))
    ids, mask = input_ids[:CHECK_SEQUENCES, :CHECK_TOKENS], attention_mask[:CHECK_SEQUENCES, :CHECK_TOKENS]
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    hidden = hidden_states(model, {'input_ids': ids, 'attention_mask': mask})
    weight = output_head(model)  # read after the forward passes (under FSDP they leave it unsharded)
    fused = hidden.to(weight.device) @ weight.T
    keep = mask.to(weight.device).bool()
    if not keep.any():
        return None
    expected, actual = logits.to(weight.device)[keep].float(), fused[keep].float()
    exact_fp32 = logits.dtype == torch.float32 and not (weight.is_cuda and torch.backends.cuda.matmul.allow_tf32)
    tolerance = 1e-3 if exact_fp32 else 2 ** -5  # relative to the largest logit; bf16/fp16/TF32 round more
    scale, error = expected.abs().max().item(), (actual - expected).abs().max().item()
    if error <= tolerance * scale:
        return None
    return (f"{type(model).__name__}'s own logits differ from its final hidden states @ output weight "
            f"(max |difference| {error:.3g} on logits up to {scale:.3g}): its forward must scale or cap them")
