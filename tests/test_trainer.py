"""BasicTrainer on model=tiny: the one concatenated forward equals separate forwards, gradient
accumulation equals one large batch, and every preference loss logs the reference's metrics; the fused
statistics check themselves on the first batch; the reference computes in the policy's precision."""
import math

import pytest
import torch

import losses
import pair_layout
import sharded_trainers
import token_stats
from helpers import EQUAL_MODELS_KL_BOUND, compose_config, make_trainer, write_hh_file


def test_concatenated_forward_equals_separate_forwards(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = next(iter(trainer.train_batches()))
    assert batch['chosen_input_ids'].shape[1] != batch['rejected_input_ids'].shape[1], 'want unequal padding'
    with torch.no_grad():
        chosen, rejected = trainer.concatenated_forward(batch)
        for kind, stats in (('chosen', chosen), ('rejected', rejected)):
            ids, mask, labels = (batch[f'{kind}_{k}'] for k in ('input_ids', 'attention_mask', 'labels'))
            want = losses.tdpo_get_batch_logps(trainer.policy(ids, attention_mask=mask).logits,
                                                  trainer.reference_model(ids, attention_mask=mask).logits, labels)
            for got, expected in zip(stats, want):
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (chosen.position_kl > 0).all() and (rejected.position_kl > 0).all()


@pytest.mark.parametrize('loss', ['tdpo', 'sft'])
def test_batch_of_4_equals_2_accumulation_steps_of_2(tmp_path, loss):
    results = []
    for accumulation in (1, 2):
        trainer = make_trainer(tmp_path / str(accumulation), loss=loss, gradient_accumulation_steps=accumulation)
        before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        trainer.train()
        assert trainer.batch_counter == 1 and trainer.example_counter == 4
        results.append((before, {k: v.clone() for k, v in trainer.policy.state_dict().items()}))
    (before_1, after_1), (before_2, after_2) = results
    changed = [k for k in after_1 if not torch.equal(before_1[k], after_1[k])]
    assert changed, 'the update changed no weight'
    for k in after_1:
        torch.testing.assert_close(before_1[k], before_2[k])
        torch.testing.assert_close(after_1[k], after_2[k], rtol=1e-4, atol=1e-5)


def naive_sequence_stats(policy_logits, reference_logits, labels):
    """(Σ_t log πθ(y_t) − log π_ref(y_t), SeqKL = Σ_t KL(π_ref ‖ πθ), Σ_t log πθ(y_t)) of each sequence, in float64,
    position by position with an explicit softmax over the vocabulary (TDPO, Eqs. 14, 18)."""
    out = []
    for b in range(labels.shape[0]):
        margin = kl = logp = 0.0
        for t in range(labels.shape[1] - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            p = policy_logits[b, t].double().exp() / policy_logits[b, t].double().exp().sum()
            q = reference_logits[b, t].double().exp() / reference_logits[b, t].double().exp().sum()
            margin += (p[y].log() - q[y].log()).item()
            kl += (q * (q.log() - p.log())).sum().item()
            logp += p[y].log().item()
        out.append((margin, kl, logp))
    return out


@pytest.mark.parametrize('loss', ['tdpo', 'dpo', 'ipo'])
def test_preference_losses_log_reference_metric_names(tmp_path, loss):
    """The metrics against the papers' formulas on statistics computed here, in float64, from separate
    forwards of the policy and the reference on the chosen and on the rejected sequences."""
    trainer = make_trainer(tmp_path, loss=loss)
    batch = next(iter(trainer.train_batches()))
    with torch.no_grad():
        mean_loss, metrics = trainer.get_batch_metrics(batch, train=True)
        naive = {}
        for kind in ('chosen', 'rejected'):
            ids, mask, labels = (batch[f'{kind}_{k}'] for k in ('input_ids', 'attention_mask', 'labels'))
            naive[kind] = naive_sequence_stats(trainer.policy(ids, attention_mask=mask).logits,
                                               trainer.reference_model(ids, attention_mask=mask).logits, labels)
    expected = {f'{group}_train/{name}' for group, names in (('rewards', ('chosen', 'rejected', 'accuracies', 'margins')),
                                                             ('kl', ('chosen', 'rejected', 'margin')),
                                                             ('logps', ('chosen', 'rejected'))) for name in names}
    assert expected | {'loss/train'} == set(metrics)
    assert all(len(v) == 4 for v in metrics.values())
    c = trainer.config.loss
    beta = c.beta
    want = {k: [] for k in expected | {'loss/train'}}
    for (margin_w, kl_w, logp_w), (margin_l, kl_l, logp_l) in zip(naive['chosen'], naive['rejected']):
        u = margin_w - margin_l
        if loss == 'tdpo':  # rewards β(log ratio + SeqKL); Eq. 20 (TDPO2) or Eq. 18 (TDPO1)
            reward_w, reward_l = beta * (margin_w + kl_w), beta * (margin_l + kl_l)
            z = beta * (u - (c.alpha if c.if_tdpo2 else 1.0) * (kl_l - kl_w))
            example_loss = math.log1p(math.exp(-z))
        else:  # rewards β·log ratio; DPO (Eq. 7) or IPO (Azar et al., Eq. 17)
            reward_w, reward_l = beta * margin_w, beta * margin_l
            example_loss = (u - 1 / (2 * beta)) ** 2 if loss == 'ipo' else math.log1p(math.exp(-beta * u))
        for key, value in (('rewards_train/chosen', reward_w), ('rewards_train/rejected', reward_l),
                           ('rewards_train/margins', reward_w - reward_l), ('kl_train/chosen', kl_w),
                           ('kl_train/rejected', kl_l), ('kl_train/margin', kl_w - kl_l), ('logps_train/chosen', logp_w),
                           ('logps_train/rejected', logp_l), ('loss/train', example_loss),
                           ('rewards_train/accuracies', float(reward_w > reward_l))):
            want[key].append(value)
    assert all(abs(m) > 1e-3 for m in want['rewards_train/margins']), 'an accuracy too close to call'
    assert all(k > 1e-3 for k in want['kl_train/chosen']), 'the policy should differ from the reference'
    for key in sorted(want):
        torch.testing.assert_close(torch.tensor(metrics[key], dtype=torch.float64), torch.tensor(want[key], dtype=torch.float64),
                                   rtol=1e-4, atol=1e-5, msg=lambda m: f'{key}: {m}')
    assert mean_loss.item() == pytest.approx(sum(want['loss/train']) / 4, rel=1e-5)


def test_stats_impls_agree_on_metrics_and_gradients(tmp_path):
    """naive, chunked and fused concatenated forwards: same statistics, loss and policy gradients."""
    trainer = make_trainer(tmp_path)
    batch = next(iter(trainer.train_batches()))
    results = {}
    for impl in ('naive', 'chunked', 'fused'):
        trainer.stats_impl = impl
        trainer.policy.zero_grad()
        loss, metrics = trainer.get_batch_metrics(batch)
        loss.backward()
        results[impl] = (loss.item(), metrics, {n: p.grad.clone() for n, p in trainer.policy.named_parameters()})
    naive_loss, naive_metrics, naive_grads = results['naive']
    for impl in ('chunked', 'fused'):
        loss, metrics, grads = results[impl]
        assert loss == pytest.approx(naive_loss, rel=1e-5, abs=1e-6)
        for k in naive_metrics:
            torch.testing.assert_close(torch.tensor(metrics[k]), torch.tensor(naive_metrics[k]), rtol=1e-4, atol=1e-4)
        for n in naive_grads:
            torch.testing.assert_close(grads[n], naive_grads[n], rtol=1e-3, atol=1e-6)


def test_named_eval_files_are_used_whole_and_so_are_training_files(tmp_path):
    eval_file = write_hh_file(tmp_path / 'eval.jsonl', n=10)
    trainer = make_trainer(tmp_path, eval_datasets=f'[{eval_file}]', n_eval_examples=100)
    assert len(trainer.train_examples) == 48 and len(trainer.eval_examples) == 10
    held_out = make_trainer(tmp_path / 'split', n_eval_examples=100, eval_fraction=0.25)
    assert 0 < len(held_out.eval_examples) < 48 and len(held_out.train_examples) + len(held_out.eval_examples) == 48


# ---- the fused statistics check themselves; the reference computes as the policy does ----

def scale_logits(model, factor):
    """Make `model` a subclass whose forward multiplies its logits by `factor`: its config and output layer
    look plain, so only a numerical check can tell that its logits are not final hidden states @ weight."""
    class ScaledLogits(type(model)):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * factor
            return output
    model.__class__ = ScaledLogits


def test_fused_stats_check_falls_back_to_chunked_when_the_forward_scales_logits(tmp_path, capsys):
    trainer = make_trainer(tmp_path)
    for model in (trainer.policy, trainer.reference_model):
        scale_logits(model, 1.5)
    assert trainer.stats_impl == 'fused'  # output_head cannot see the scaling
    batch = next(iter(trainer.train_batches()))
    inputs = pair_layout.concatenated_inputs(batch)
    ids, mask, labels = (inputs[f'concatenated_{k}'] for k in ('input_ids', 'attention_mask', 'labels'))
    with torch.no_grad():  # what the run must compute: the statistics of the models' own logits
        want = losses.tdpo_get_batch_logps(trainer.policy(ids, attention_mask=mask).logits,
                                              trainer.reference_model(ids, attention_mask=mask).logits, labels)
        unchecked, _ = trainer.concatenated_forward(batch)  # the fused path unchecked: wrong statistics
        assert not torch.allclose(unchecked.position_kl, want[1][:4], rtol=1e-2)
        _, metrics = trainer.get_batch_metrics(batch)
    out = capsys.readouterr().out
    assert trainer.stats_impl == 'chunked' and out.count("using 'chunked'") == 1, out
    assert "stats_impl=fused: ScaledLogits's own logits differ from its final hidden states @ output weight" in out
    torch.testing.assert_close(torch.tensor(metrics['kl_train/chosen']), want[1][:4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(metrics['kl_train/rejected']), want[1][4:], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        trainer.get_batch_metrics(batch)
    assert "using 'chunked'" not in capsys.readouterr().out  # one message per run


def test_fused_stats_check_keeps_fused_for_a_plain_model(tmp_path, capsys, monkeypatch):
    trainer = make_trainer(tmp_path)
    calls = []
    check = token_stats.fused_head_mismatch
    monkeypatch.setattr(token_stats, 'fused_head_mismatch', lambda *a: calls.append(1) or check(*a))
    batch = next(iter(trainer.train_batches()))
    for _ in range(2):
        with torch.no_grad():
            trainer.get_batch_metrics(batch)
    assert trainer.stats_impl == 'fused' and trainer.fused_stats_checked
    assert len(calls) == 2  # policy and reference, on the first batch only
    assert "using 'chunked'" not in capsys.readouterr().out


def test_offloaded_output_layer_uses_chunked(tmp_path, capsys):
    """device_map='balanced' offloads what does not fit (accelerate keeps such weights on 'meta' and loads
    them inside the forward): the fused path cannot read the output weight, so the trainer uses chunked."""
    import accelerate
    trainer = make_trainer(tmp_path)
    batch = next(iter(trainer.train_batches()))
    trainer.stats_impl = 'naive'
    with torch.no_grad():
        want, _ = trainer.concatenated_forward(batch)
    accelerate.cpu_offload(trainer.policy, execution_device=torch.device('cpu'))
    assert trainer.policy.get_output_embeddings().weight.device.type == 'meta'
    assert trainer.choose_stats_impl() == 'chunked' and "using 'chunked'" in capsys.readouterr().out
    trainer.stats_impl = 'chunked'
    with torch.no_grad():
        got, _ = trainer.concatenated_forward(batch)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('trainer_name, overrides, expected', [
    ('BasicTrainer', {}, 'float32'),
    ('BasicTrainer', {'policy_dtype': 'bfloat16'}, 'bfloat16'),
    ('BasicTrainer', {'fsdp_policy_mp': 'bfloat16'}, 'float32'),       # BasicTrainer has no mixed precision
    ('FSDPTrainer', {'fsdp_policy_mp': 'bfloat16'}, 'bfloat16'),
    ('TensorParallelTrainer', {'policy_dtype': 'bfloat16'}, 'bfloat16'),
    ('FSDPTrainer', {'fsdp_policy_mp': 'bfloat16', 'reference_dtype': 'float16'}, 'float16'),  # explicit wins
    ('BasicTrainer', {'reference_dtype': 'float32', 'policy_dtype': 'bfloat16'}, 'float32'),
])
def test_reference_dtype_follows_the_policy_compute_dtype(trainer_name, overrides, expected):
    config = compose_config(['exp_name=x', 'model=pythia28', *(f'model.{k}={v}' for k, v in overrides.items())])
    assert sharded_trainers.TRAINERS[trainer_name].reference_dtype(config.model) == expected


@pytest.mark.parametrize('policy_dtype, reference_dtype, equal', [
    ('float32', None, True), ('bfloat16', None, True), ('bfloat16', 'float32', False), ('float32', 'float16', False)])
def test_policy_equal_to_reference_gives_zero_kl_and_log2_at_the_first_evaluation(tmp_path, policy_dtype,
                                                                                    reference_dtype, equal):
    """The default reference precision (null) is the policy's, so a run starting from policy == reference
    logs SeqKL 0 and loss log 2 (to float32 rounding); a reference in another precision (explicit) does not.
    initializer_range=0.3 gives the random model logits of a trained model's size (near 0, precision hardly
    shows)."""
    overrides = {'model.policy_dtype': policy_dtype, '+model.random_init.initializer_range': 0.3,
                 'n_eval_examples': 8, 'eval_fraction': 0.25, 'eval_batch_size': 4, 'sample_during_eval': False}
    if reference_dtype:
        overrides['model.reference_dtype'] = reference_dtype
    trainer = make_trainer(tmp_path, perturb=False, **overrides)
    assert trainer.reference_model.dtype == getattr(torch, reference_dtype or policy_dtype)
    metrics = trainer.evaluate()
    kl = max(abs(metrics['kl_eval/chosen']), abs(metrics['kl_eval/rejected']))
    loss_error = abs(metrics['loss/eval'] - math.log(2))
    if equal:  # KL: see EQUAL_MODELS_KL_BOUND; loss measured <= 5e-8
        assert kl < EQUAL_MODELS_KL_BOUND and loss_error < 1e-6, (kl, loss_error)
    else:      # measured: KL 0.052 (bf16 policy, fp32 reference) and 6.7e-4 (fp32 policy, fp16 reference)
        assert kl > 1e-4 and loss_error > 1e-5, (kl, loss_error)
