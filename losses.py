"""Loss math: pure functions of tensors, the losses of SFT, TDPO (Zeng et al., ICML 2024, arXiv 2404.11999),
DPO, conservative DPO, IPO and f-DPO and the per-sequence statistics they are built from. Each is tested against
a naive implementation of its equation (tests/test_losses.py). B = sequences, T = tokens, V = vocabulary.

`tdpo_get_batch_logps` and `get_batch_logps` take the reference implementation's arguments and return its
values (trainers.py keeps its names `_tdpo_get_batch_logps`, `_get_batch_logps` as aliases); the trainer computes
the same statistics faster (token_stats.py) and lays pairs out for one forward (pair_layout.py).
Imports nothing of this project.
"""
from typing import Callable, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig


def shift_labels(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Labels (B, T) with -100 on prompt and padding -> (targets (B, T-1) with 0 at masked
    positions, float mask (B, T-1)). Logit t predicts token t+1."""
    labels = labels[:, 1:]
    mask = labels != -100
    return labels.masked_fill(~mask, 0), mask


def masked_sum(values: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum (or mean) over the T axis of `values` where `mask`; a row with no tokens gives 0, not NaN."""
    total = (values * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def get_batch_logps(logits: torch.Tensor, labels: torch.Tensor, average_log_prob: bool = False) -> torch.Tensor:
    """log π(y|x) = Σ_t log π(y_t | x, y_<t) over response tokens (DPO paper, Eq. 7 inputs).

    logits (B, T, V), labels (B, T) with -100 where not a response token -> (B,).
    """
    assert logits.shape[:-1] == labels.shape, (logits.shape, labels.shape)
    targets, mask = shift_labels(labels)
    logps = logits[:, :-1].float().log_softmax(-1)
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return masked_sum(token_logps, mask, average_log_prob)


def row_logps(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, seq: torch.Tensor,
               n_sequences: int) -> torch.Tensor:
    """`get_batch_logps` on flattened positions: logits (M, V); rows (N,) the positions that predict
    response tokens `targets` (N,) of sequences `seq` (N,) (pair_layout.response_rows) -> (n_sequences,)."""
    token_logps = logits[rows].float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.zeros(n_sequences, device=logits.device).index_add_(0, seq, token_logps)


def tdpo_get_batch_logps(logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor,
                          average_log_prob: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence TDPO statistics, with the reference implementation's arguments and returns.

    logits, reference_logits (B, T, V) of policy πθ and reference π_ref; labels (B, T).
    Returns three (B,) tensors, sums over response tokens t (means if average_log_prob):
      logps_margin = Σ_t log πθ(y_t|x,y_<t) − log π_ref(y_t|x,y_<t)                  (Eq. 18, u)
      position_kl  = Σ_t KL(π_ref(·|x,y_<t) ‖ πθ(·|x,y_<t)) over the full vocabulary (SeqKL, Eq. 14)
      logps        = Σ_t log πθ(y_t|x,y_<t)
    Both sides use log_softmax: the reference's softmax().log() gives −inf·0 = NaN on underflow.
    """
    assert logits.shape == reference_logits.shape and logits.shape[:-1] == labels.shape
    targets, mask = shift_labels(labels)
    logps = logits[:, :-1].float().log_softmax(-1)
    reference_logps = reference_logits[:, :-1].float().log_softmax(-1)
    position_kl = (reference_logps.exp() * (reference_logps - logps)).sum(-1)
    token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    reference_token_logps = reference_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (masked_sum(token_logps - reference_token_logps, mask, average_log_prob),
            masked_sum(position_kl, mask, average_log_prob),
            masked_sum(token_logps, mask, average_log_prob))


def tdpo_loss(chosen_logps_margin: torch.Tensor, rejected_logps_margin: torch.Tensor,
              chosen_position_kl: torch.Tensor, rejected_position_kl: torch.Tensor,
              beta: float, alpha: float = 0.5, if_tdpo2: bool = True
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TDPO losses for B pairs (all inputs (B,), from `tdpo_get_batch_logps`).

    u = logps_margin_w − logps_margin_l, δ = SeqKL_l − SeqKL_w.
      TDPO1 (Eq. 18): −log σ(β(u − δ))
      TDPO2 (Eq. 20): −log σ(β(u − α(SeqKL_l − sg(SeqKL_w))))
    Returns (losses, chosen_rewards, rejected_rewards), rewards = β·(logps_margin + position_kl)
    detached, as the reference logs them.
    """
    margin = chosen_logps_margin - rejected_logps_margin
    if if_tdpo2:
        logits = margin - alpha * (rejected_position_kl - chosen_position_kl.detach())
    else:
        logits = margin - (rejected_position_kl - chosen_position_kl)
    losses = -F.logsigmoid(beta * logits)
    chosen_rewards = beta * (chosen_logps_margin + chosen_position_kl).detach()
    rejected_rewards = beta * (rejected_logps_margin + rejected_position_kl).detach()
    return losses, chosen_rewards, rejected_rewards


def preference_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                    reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                    beta: float, label_smoothing: float = 0.0, ipo: bool = False,
                    reference_free: bool = False, divergence: str = 'reverse_kl'
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023, Eq. 7), conservative DPO (label_smoothing), IPO (Azar et al. 2023,
    Eq. 17) and f-DPO (Wang et al. 2023) on (B,) sequence log-probs.

    f-DPO's implicit reward is β·f'(πθ/π_ref) for the f-divergence constraint: reverse_kl (f'(u) =
    log u + 1, which is DPO) or forward_kl (f'(u) = −1/u, reward −β·π_ref/πθ). The loss is
    −log σ(r_w − r_l). reference_free drops π_ref from the loss (not from the logged rewards).
    Returns (losses, chosen_rewards, rejected_rewards), rewards detached."""
    def f_prime(log_ratio):  # f'(u) at u = πθ/π_ref, without additive constants (they cancel in r_w − r_l)
        return log_ratio if divergence == 'reverse_kl' else -torch.exp(-log_ratio)
    if divergence not in ('reverse_kl', 'forward_kl'):
        raise ValueError(f'divergence={divergence!r}; valid: reverse_kl, forward_kl')
    if divergence == 'forward_kl' and (ipo or reference_free):
        raise ValueError('divergence=forward_kl is f-DPO: it needs the reference and the logistic loss')
    chosen_log_ratio = policy_chosen_logps - reference_chosen_logps
    rejected_log_ratio = policy_rejected_logps - reference_rejected_logps
    if reference_free:
        logits = policy_chosen_logps - policy_rejected_logps
    else:
        logits = f_prime(chosen_log_ratio) - f_prime(rejected_log_ratio)
    if ipo:
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    return losses, beta * f_prime(chosen_log_ratio).detach(), beta * f_prime(rejected_log_ratio).detach()


class SequenceStats(NamedTuple):
    """Per-sequence statistics (each (B,)) that every preference loss and metric is built from."""
    logps_margin: torch.Tensor  # Σ_t log πθ − log π_ref of the taken tokens
    position_kl: torch.Tensor   # SeqKL: Σ_t KL(π_ref ‖ πθ) over the vocabulary
    logps: torch.Tensor         # Σ_t log πθ of the taken tokens


PreferenceLoss = Callable[[SequenceStats, SequenceStats], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def build_preference_loss(loss_config: DictConfig) -> PreferenceLoss:
    """Decide the loss once: (chosen stats, rejected stats) -> (losses, chosen_rewards, rejected_rewards)."""
    c = loss_config
    if c.name == 'tdpo':
        return lambda w, l: tdpo_loss(w.logps_margin, l.logps_margin, w.position_kl, l.position_kl,
                                      beta=c.beta, alpha=c.alpha, if_tdpo2=c.if_tdpo2)
    if c.name in ('dpo', 'ipo'):
        ipo, smoothing = c.name == 'ipo', c.get('label_smoothing', 0.0)
        reference_free, divergence = c.get('reference_free', False), c.get('divergence', 'reverse_kl')
        return lambda w, l: preference_loss(w.logps, l.logps, w.logps - w.logps_margin, l.logps - l.logps_margin,
                                            beta=c.beta, label_smoothing=smoothing, ipo=ipo,
                                            reference_free=reference_free, divergence=divergence)
    raise ValueError(f"unknown loss.name={c.name!r}; valid: sft, tdpo, dpo, ipo")
