"""The pair forward: chosen and rejected responses through the policy and the reference -> their statistics.

What belongs here: the choices a run makes once about its forward passes (the statistics implementation:
`choose_stats_impl`, `check_fused_stats`; the pair layout: `choose_pair_layout`), the passes themselves
(`concatenated_forward` for the preference losses, `sft_logps` for SFT) and the per-example metrics of a
preference batch (`preference_metrics`), as functions of models, tensors and config values. The trainer's
methods `choose_stats_impl`, `check_fused_stats`, `choose_pair_layout` and `concatenated_forward` are thin
hooks that call these with its models and its hooks (`reference_forward`, `final_hidden_states`, `any_rank`),
so that a distributed trainer changes them by overriding those hooks. The math itself is elsewhere:
losses.py (naive), token_stats.py (chunked, fused), pair_layout.py (the layouts).
"""
from typing import Callable, Dict, Optional, Tuple

import torch

import pair_layout
import token_stats
import utils
from losses import SequenceStats, get_batch_logps, row_logps, tdpo_get_batch_logps


def choose_stats_impl(stats_impl: str, is_sft: bool, policy) -> str:
    """`stats_impl` (config.stats_impl), or 'chunked' (saying why, once) where 'fused' cannot work: an output
    layer that is not a plain linear map on a device."""
    if stats_impl != 'fused' or is_sft:
        return stats_impl
    if token_stats.output_head(policy) is None:
        utils.rank0_print("stats_impl=fused: not with this model's output layer; using 'chunked'")
        return 'chunked'
    return 'fused'


def check_fused_stats(batch: Dict, policy, reference_forward: Callable, final_hidden_states: Callable,
                      any_rank: Callable[[bool], bool]) -> str:
    """'fused' if the logits the fused statistics stand for (final hidden states @ output weight) equal each
    model's own on `batch` (on every rank), else 'chunked' (saying why). reference_forward, final_hidden_states,
    any_rank: the trainer's hooks of those names."""
    ids, mask = batch['chosen_input_ids'], batch['chosen_attention_mask']
    problem: Optional[str] = token_stats.fused_head_mismatch(policy, ids, mask, final_hidden_states)
    if problem is None:
        with reference_forward() as reference:
            problem = token_stats.fused_head_mismatch(reference, ids, mask, final_hidden_states)
    if any_rank(problem is not None):
        utils.rank0_print(f"stats_impl=fused: {problem or 'the check failed on another rank'}; using 'chunked'")
        return 'chunked'
    return 'fused'


def choose_pair_layout(layout: str, models, vocab_size: int) -> str:
    """`layout`, or 'padded' (with one message naming why) if one of `models` (None: absent) cannot take its
    masks. Prepares each model for the layout on the way (pair_layout.prepare_model)."""
    if layout == 'padded':
        return layout
    for model in models:
        reason = model is not None and (pair_layout.prepare_model(model) or pair_layout.check_model(model, vocab_size))
        if reason:
            utils.rank0_print(f"pair_layout={layout}: {reason}; using 'padded'")
            return 'padded'
    return layout


def concatenated_forward(batch: Dict, policy, reference_forward: Callable, final_hidden_states: Callable,
                         layout_name: str, stats_impl: str, max_length: int) -> Tuple[SequenceStats, SequenceStats]:
    """Chosen and rejected through the policy in one pass and through the reference in one pass (no grad),
    laid out as `layout_name` says (padded, shared or packed: pair_layout.py) -> per-sequence statistics for
    the chosen half and the rejected half, computed as `stats_impl` says: naive (the reference's
    full-vocabulary tensors), chunked (same logits, bounded memory, response rows only) or fused (from hidden
    states; full logits never exist). All are exact. reference_forward, final_hidden_states: the trainer's hooks."""
    layout = pair_layout.arrange(batch, layout_name, max_length)
    n = layout.n_sequences
    if stats_impl == 'fused':
        hidden = final_hidden_states(policy, pair_layout.model_inputs(layout, policy))
        with reference_forward() as reference:
            reference_hidden = final_hidden_states(reference, pair_layout.model_inputs(layout, reference))
            reference_head = token_stats.output_head(reference)
        stats = token_stats.fused_row_stats(hidden.flatten(0, 1), token_stats.output_head(policy),
                                            reference_hidden.flatten(0, 1), reference_head,
                                            *pair_layout.response_rows(layout), n)
    else:
        logits = policy(**pair_layout.model_inputs(layout, policy)).logits
        with reference_forward() as reference:
            reference_logits = reference(**pair_layout.model_inputs(layout, reference)).logits
        if stats_impl == 'naive':
            stats = tdpo_get_batch_logps(pair_layout.unpack(layout, logits), pair_layout.unpack(layout, reference_logits),
                                          layout.labels)
        else:
            stats = token_stats.chunked_row_stats(logits.flatten(0, 1), reference_logits.flatten(0, 1),
                                                  *pair_layout.response_rows(layout), n)
    return SequenceStats(*(s[:n // 2] for s in stats)), SequenceStats(*(s[n // 2:] for s in stats))


def preference_metrics(split: str, chosen: SequenceStats, rejected: SequenceStats, chosen_rewards: torch.Tensor,
                       rejected_rewards: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-example metrics (B,) of a preference batch, with the reference's names (split: 'train' or 'eval')."""
    return {
        f'rewards_{split}/chosen': chosen_rewards, f'rewards_{split}/rejected': rejected_rewards,
        f'rewards_{split}/accuracies': (chosen_rewards > rejected_rewards).float(),
        f'rewards_{split}/margins': chosen_rewards - rejected_rewards,
        f'kl_{split}/chosen': chosen.position_kl, f'kl_{split}/rejected': rejected.position_kl,
        f'kl_{split}/margin': chosen.position_kl - rejected.position_kl,
        f'logps_{split}/rejected': rejected.logps, f'logps_{split}/chosen': chosen.logps}


def sft_logps(batch: Dict, policy, layout_name: str, max_length: int) -> torch.Tensor:
    """log πθ(y|x) of each chosen response (B,), padded (the reference's computation) or packed."""
    layout = pair_layout.arrange(batch, layout_name, max_length, sft=True)
    logits = policy(**pair_layout.model_inputs(layout, policy)).logits
    if layout.document is None:
        return get_batch_logps(logits, layout.labels)
    return row_logps(logits.flatten(0, 1), *pair_layout.response_rows(layout), layout.n_sequences)
