"""The loss math of trainers.py against naive, loop-based float64 implementations of the papers'
equations, on values and gradients, plus the invariants (policy == reference -> zero KL, loss log 2)."""
import math

import pytest
import torch
from omegaconf import OmegaConf

import pair_layout
import trainers
from losses import SequenceStats, get_batch_logps, preference_loss, tdpo_get_batch_logps, tdpo_loss

B, T, V = 3, 7, 11


def random_batch(seed=0, b=B, t=T, v=V):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    reference_logits = torch.randn(b, t, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100          # prompt
    labels[1, :1] = -100
    labels[1, -2:] = -100         # padding
    labels[2, :] = -100           # a row with no response tokens (truncated to nothing)
    return logits, reference_logits, labels


def naive_stats(logits, reference_logits, labels):
    """Σ_t over response tokens, position by position with explicit softmax (Eqs. 14, 18)."""
    out = []
    for b in range(logits.shape[0]):
        margin = kl = logp = logits.new_zeros(())
        for t in range(logits.shape[1] - 1):
            y = labels[b, t + 1].item()
            if y == -100:
                continue
            p = logits[b, t].exp() / logits[b, t].exp().sum()
            q = reference_logits[b, t].exp() / reference_logits[b, t].exp().sum()
            margin = margin + p[y].log() - q[y].log()
            kl = kl + (q * (q.log() - p.log())).sum()
            logp = logp + p[y].log()
        out.append((margin, kl, logp))
    return [torch.stack(x) for x in zip(*out)]


def test_tdpo_batch_logps_matches_naive_values_and_gradients():
    logits, reference_logits, labels = random_batch()
    logits.requires_grad_(True)
    got = tdpo_get_batch_logps(logits, reference_logits, labels)
    want = naive_stats(logits, reference_logits, labels)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    for i in range(3):
        grad_got, = torch.autograd.grad((got[i].double() * weights[:got[i].shape[0]]).sum(), logits, retain_graph=True)
        grad_want, = torch.autograd.grad((want[i] * weights[:want[i].shape[0]]).sum(), logits, retain_graph=True)
        torch.testing.assert_close(grad_got, grad_want, rtol=1e-5, atol=1e-6)
    assert got[0][2] == 0 and got[1][2] == 0, 'a row without response tokens contributes 0'


def test_average_log_prob_is_mean_and_empty_row_is_not_nan():
    logits, reference_logits, labels = random_batch()
    sums = tdpo_get_batch_logps(logits, reference_logits, labels)
    means = tdpo_get_batch_logps(logits, reference_logits, labels, average_log_prob=True)
    n_tokens = (labels[:, 1:] != -100).sum(-1)
    for s, m in zip(sums, means):
        assert torch.isfinite(m).all()
        torch.testing.assert_close(m[:2], s[:2] / n_tokens[:2])
    torch.testing.assert_close(get_batch_logps(logits, labels, average_log_prob=True), means[2])


def test_underflowing_reference_probability_gives_no_nan():
    """The reference's softmax().log() gives log 0 = -inf and 0 * -inf = NaN here; log_softmax does not."""
    logits = torch.zeros(1, 3, 5, dtype=torch.float32)
    reference_logits = torch.tensor([[[0, -200, 0, 0, 0.]] * 3])
    labels = torch.tensor([[-100, 1, 2]])
    stats = tdpo_get_batch_logps(logits, reference_logits, labels)
    assert all(torch.isfinite(s).all() for s in stats)
    naive_kl = (reference_logits.softmax(-1) * (reference_logits.softmax(-1).log() - logits.log_softmax(-1))).sum(-1)
    assert torch.isnan(naive_kl).any(), 'the hazard this test guards against no longer reproduces'


def test_get_batch_logps_matches_naive():
    logits, reference_logits, labels = random_batch(seed=1)
    torch.testing.assert_close(get_batch_logps(logits, labels).double(),
                               naive_stats(logits, reference_logits, labels)[2], rtol=1e-5, atol=1e-5)


def naive_tdpo(cm, rm, ckl, rkl, beta, alpha, tdpo2):
    """Eq. 18 (TDPO1) and Eq. 20 (TDPO2) for one pair, with plain math."""
    delta = (rkl - ckl) * (alpha if tdpo2 else 1.0)
    z = beta * ((cm - rm) - delta)
    return -math.log(1 / (1 + math.exp(-z)))


@pytest.mark.parametrize('tdpo2', [True, False])
def test_tdpo_loss_values_and_gradients(tdpo2):
    g = torch.Generator().manual_seed(2)
    cm, rm, ckl, rkl = (torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(4))
    with torch.no_grad():
        ckl.abs_(), rkl.abs_()
    beta, alpha = 0.3, 0.7
    losses, chosen_rewards, rejected_rewards = tdpo_loss(cm, rm, ckl, rkl, beta=beta, alpha=alpha, if_tdpo2=tdpo2)
    for i in range(5):
        want = naive_tdpo(cm[i].item(), rm[i].item(), ckl[i].item(), rkl[i].item(), beta, alpha, tdpo2)
        assert losses[i].item() == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(chosen_rewards, beta * (cm + ckl).detach())
    torch.testing.assert_close(rejected_rewards, beta * (rm + rkl).detach())
    assert not chosen_rewards.requires_grad
    losses.sum().backward()
    # d/dz -log σ(z) = -σ(-z); z = β(cm - rm - w·(rkl - ckl)), w = α (TDPO2) or 1 (TDPO1)
    w = alpha if tdpo2 else 1.0
    z = beta * ((cm - rm) - w * (rkl - ckl)).detach()
    s = -torch.sigmoid(-z)
    torch.testing.assert_close(cm.grad, s * beta)
    torch.testing.assert_close(rm.grad, -s * beta)
    torch.testing.assert_close(rkl.grad, -s * beta * w)
    if tdpo2:  # stop-gradient on SeqKL(y_w): no gradient reaches it
        assert ckl.grad is None or not ckl.grad.any()
    else:
        torch.testing.assert_close(ckl.grad, s * beta)


def naive_dpo(pc, pr, rc, rr, beta, smoothing=0.0, ipo=False, reference_free=False):
    h = (pc - pr) - (0 if reference_free else (rc - rr))
    if ipo:
        return (h - 1 / (2 * beta)) ** 2
    log_sig = lambda x: -math.log1p(math.exp(-x))
    return -(1 - smoothing) * log_sig(beta * h) - smoothing * log_sig(-beta * h)


@pytest.mark.parametrize('kwargs', [{}, {'label_smoothing': 0.2}, {'ipo': True}, {'reference_free': True}])
def test_preference_loss_values_and_gradients(kwargs):
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(4, generator=g, dtype=torch.float64) * 5 for _ in range(4))
    pc.requires_grad_(True), pr.requires_grad_(True)
    beta = 0.2
    losses, cr, rjr = preference_loss(pc, pr, rc, rr, beta=beta, **kwargs)
    naive = [naive_dpo(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), beta,
                       kwargs.get('label_smoothing', 0.0), kwargs.get('ipo', False),
                       kwargs.get('reference_free', False)) for i in range(4)]
    torch.testing.assert_close(losses.detach(), torch.tensor(naive, dtype=torch.float64))
    torch.testing.assert_close(cr, beta * (pc - rc).detach())
    # gradient against finite differences of the naive formula
    losses.sum().backward()
    eps = 1e-6
    for i in range(4):
        bumped = naive_dpo(pc[i].item() + eps, pr[i].item(), rc[i].item(), rr[i].item(), beta,
                           kwargs.get('label_smoothing', 0.0), kwargs.get('ipo', False), kwargs.get('reference_free', False))
        assert pc.grad[i].item() == pytest.approx((bumped - naive[i]) / eps, rel=1e-4, abs=1e-6)
        assert pr.grad[i].item() == pytest.approx(-pc.grad[i].item(), rel=1e-9, abs=1e-12)


def naive_forward_kl_fdpo(pc, pr, rc, rr, beta):
    """f-DPO with forward KL (Wang et al. 2023): f'(u) = -1/u, loss -log sigmoid(beta (f'(u_w) - f'(u_l))),
    from the probability ratios themselves."""
    u_w, u_l = math.exp(pc) / math.exp(rc), math.exp(pr) / math.exp(rr)
    h = -1 / u_w + 1 / u_l
    return math.log1p(math.exp(-beta * h)), -beta / u_w, -beta / u_l


def test_forward_kl_fdpo_values_and_gradients():
    g = torch.Generator().manual_seed(6)
    pc, pr, rc, rr = (torch.randn(4, generator=g, dtype=torch.float64) * 2 for _ in range(4))
    pc.requires_grad_(True), pr.requires_grad_(True)
    beta = 0.3
    losses, cr, rjr = preference_loss(pc, pr, rc, rr, beta=beta, divergence='forward_kl')
    naive = [naive_forward_kl_fdpo(pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item(), beta) for i in range(4)]
    torch.testing.assert_close(losses.detach(), torch.tensor([n[0] for n in naive], dtype=torch.float64))
    torch.testing.assert_close(cr, torch.tensor([n[1] for n in naive], dtype=torch.float64))
    torch.testing.assert_close(rjr, torch.tensor([n[2] for n in naive], dtype=torch.float64))
    losses.sum().backward()
    eps = 1e-6
    for i in range(4):
        args = [pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item()]
        for j, grad in ((0, pc.grad), (1, pr.grad)):
            bumped = list(args)
            bumped[j] += eps
            finite_difference = (naive_forward_kl_fdpo(*bumped, beta)[0] - naive[i][0]) / eps
            assert grad[i].item() == pytest.approx(finite_difference, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match='f-DPO'):
        preference_loss(pc, pr, rc, rr, beta=beta, divergence='forward_kl', ipo=True)
    with pytest.raises(ValueError, match='valid'):
        preference_loss(pc, pr, rc, rr, beta=beta, divergence='js')


@pytest.mark.parametrize('loss', [
    {'name': 'tdpo', 'beta': 0.1, 'alpha': 0.5, 'if_tdpo2': True},
    {'name': 'tdpo', 'beta': 0.1, 'alpha': 0.5, 'if_tdpo2': False},
    {'name': 'dpo', 'beta': 0.1, 'label_smoothing': 0, 'reference_free': False},
    {'name': 'dpo', 'beta': 0.1, 'divergence': 'forward_kl'},
    {'name': 'ipo', 'beta': 0.1}])
def test_policy_equal_to_reference_gives_zero_kl_and_log2(loss):
    logits, _, labels = random_batch(seed=4, b=4)
    stats = SequenceStats(*tdpo_get_batch_logps(logits, logits.clone(), labels))
    assert torch.all(stats.position_kl.abs() < 1e-12) and torch.all(stats.logps_margin.abs() < 1e-12)
    half = lambda s: SequenceStats(*(x[:2] for x in s))
    other = lambda s: SequenceStats(*(x[2:] for x in s))
    losses, cr, rr = trainers.build_preference_loss(OmegaConf.create(loss))(half(stats), other(stats))
    expected = (1 / (2 * 0.1)) ** 2 if loss['name'] == 'ipo' else math.log(2)
    torch.testing.assert_close(losses, torch.full_like(losses, expected))
    torch.testing.assert_close(cr, rr)  # zero reward margin (forward KL's rewards are -beta, not 0)
    if loss.get('divergence') != 'forward_kl':
        torch.testing.assert_close(cr, torch.zeros_like(cr))


def test_build_preference_loss_routes_stats_to_the_right_formula():
    """Each loss built from its config, on statistics made from hand-picked log-probabilities, against the
    loss worked out by hand from the papers' equations (not from the functions it routes to).

    pair 0: log πθ(y_w) = -3, log π_ref(y_w) = -4, SeqKL_w = 0.2; log πθ(y_l) = -5, log π_ref(y_l) = -4.5, SeqKL_l = 0.6
    pair 1: log πθ(y_w) = -2, log π_ref(y_w) = -1.5, SeqKL_w = 0.9; log πθ(y_l) = -6, log π_ref(y_l) = -7, SeqKL_l = 0.1
    so the log ratios are 1, -0.5 (pair 0) and -0.5, 1 (pair 1): u = 1.5 and -1.5, SeqKL_l - SeqKL_w = 0.4 and -0.8."""
    policy_w, reference_w, kl_w = [-3.0, -2.0], [-4.0, -1.5], [0.2, 0.9]
    policy_l, reference_l, kl_l = [-5.0, -6.0], [-4.5, -7.0], [0.6, 0.1]
    stats = lambda policy, reference, kl: SequenceStats(
        logps_margin=torch.tensor(policy, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64),
        position_kl=torch.tensor(kl, dtype=torch.float64), logps=torch.tensor(policy, dtype=torch.float64))
    w, l = stats(policy_w, reference_w, kl_w), stats(policy_l, reference_l, kl_l)
    minus_log_sigmoid = lambda z: math.log1p(math.exp(-z))
    beta = 0.2

    def check(config, want_losses, want_chosen, want_rejected):
        losses, chosen_rewards, rejected_rewards = trainers.build_preference_loss(OmegaConf.create(config))(w, l)
        for got, want in ((losses, want_losses), (chosen_rewards, want_chosen), (rejected_rewards, want_rejected)):
            torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)

    # TDPO2 (Eq. 20), alpha 0.3: z = β(u − α(SeqKL_l − SeqKL_w)) = 0.2(1.5 − 0.12) = 0.276, 0.2(−1.5 + 0.24) = −0.252
    # rewards β(log ratio + SeqKL): chosen 0.2(1 + 0.2), 0.2(−0.5 + 0.9); rejected 0.2(−0.5 + 0.6), 0.2(1 + 0.1)
    tdpo_rewards = [0.24, 0.08], [0.02, 0.22]
    check({'name': 'tdpo', 'beta': beta, 'alpha': 0.3, 'if_tdpo2': True},
          [minus_log_sigmoid(0.276), minus_log_sigmoid(-0.252)], *tdpo_rewards)
    # TDPO1 (Eq. 18): z = β(u − (SeqKL_l − SeqKL_w)) = 0.2(1.5 − 0.4) = 0.22, 0.2(−1.5 + 0.8) = −0.14 (alpha unused)
    check({'name': 'tdpo', 'beta': beta, 'alpha': 0.3, 'if_tdpo2': False},
          [minus_log_sigmoid(0.22), minus_log_sigmoid(-0.14)], *tdpo_rewards)
    # DPO (Eq. 7) with label smoothing 0.1: z = β·u = 0.3, −0.3; loss −0.9 log σ(z) − 0.1 log σ(−z); rewards β·log ratio
    dpo_rewards = [0.2, -0.1], [-0.1, 0.2]
    check({'name': 'dpo', 'beta': beta, 'label_smoothing': 0.1, 'reference_free': False},
          [0.9 * minus_log_sigmoid(0.3) + 0.1 * minus_log_sigmoid(-0.3),
           0.9 * minus_log_sigmoid(-0.3) + 0.1 * minus_log_sigmoid(0.3)], *dpo_rewards)
    # reference-free DPO: z = β(log πθ(y_w) − log πθ(y_l)) = 0.2(−3 + 5) = 0.4, 0.2(−2 + 6) = 0.8
    check({'name': 'dpo', 'beta': beta, 'reference_free': True},
          [minus_log_sigmoid(0.4), minus_log_sigmoid(0.8)], *dpo_rewards)
    # IPO (Azar et al., Eq. 17): (u − 1/(2β))² = (1.5 − 2.5)², (−1.5 − 2.5)²
    check({'name': 'ipo', 'beta': beta}, [1.0, 16.0], *dpo_rewards)
    # f-DPO, forward KL: reward −β·π_ref/πθ = −0.2·e^(−log ratio); loss −log σ(r_w − r_l)
    r = lambda log_ratio: -beta * math.exp(-log_ratio)
    check({'name': 'dpo', 'beta': beta, 'divergence': 'forward_kl'},
          [minus_log_sigmoid(r(1.0) - r(-0.5)), minus_log_sigmoid(r(-0.5) - r(1.0))],
          [r(1.0), r(-0.5)], [r(-0.5), r(1.0)])
    with pytest.raises(ValueError, match='valid'):
        trainers.build_preference_loss(OmegaConf.create({'name': 'nope', 'beta': 1}))


def test_concatenated_inputs_pads_and_stacks():
    batch = {'chosen_input_ids': torch.tensor([[1, 2, 3]]), 'chosen_attention_mask': torch.tensor([[1, 1, 1]]),
             'chosen_labels': torch.tensor([[-100, 2, 3]]),
             'rejected_input_ids': torch.tensor([[1, 4, 5, 6, 7]]), 'rejected_attention_mask': torch.ones(1, 5, dtype=torch.long),
             'rejected_labels': torch.tensor([[-100, 4, 5, 6, 7]])}
    out = pair_layout.concatenated_inputs(batch)
    assert out['concatenated_input_ids'].tolist() == [[1, 2, 3, 0, 0], [1, 4, 5, 6, 7]]
    assert out['concatenated_attention_mask'].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out['concatenated_labels'].tolist() == [[-100, 2, 3, -100, -100], [-100, 4, 5, 6, 7]]


def test_the_reference_codes_import_paths_still_work():
    """Its scripts and users import the loss math from trainers and the data from preference_datasets."""
    import preference_datasets
    import trainers
    import losses
    assert trainers.tdpo_loss is losses.tdpo_loss and trainers.preference_loss is losses.preference_loss
    assert trainers._tdpo_get_batch_logps is losses.tdpo_get_batch_logps
    assert trainers._get_batch_logps is losses.get_batch_logps
    assert callable(preference_datasets.get_dataset) and callable(preference_datasets.batch_iterator)
