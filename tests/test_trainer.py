"""BasicTrainer on model=tiny: the one concatenated forward equals separate forwards, gradient
accumulation equals one large batch, and every preference loss logs the reference's metrics."""
import os

import pytest
import torch

import train
import trainers
from helpers import CACHE, compose_config, write_hh_file


def make_trainer(tmp_path, loss='tdpo', **overrides):
    os.makedirs(tmp_path, exist_ok=True)
    settings = {'model': 'tiny', 'loss': loss, 'exp_name': 't', 'datasets': f'[{write_hh_file(tmp_path / "pairs.jsonl")}]',
                'local_dirs': f'[{CACHE}]', 'local_run_dir': str(tmp_path / 'run'), 'batch_size': 4,
                'max_length': 64, 'max_prompt_length': 32, 'n_eval_examples': 0, 'do_first_eval': False,
                'wandb.enabled': False, 'optimizer': 'SGD', 'lr': 1.0, 'warmup_steps': 0, 'max_grad_norm': 1e9,
                'n_examples': 4, 'minimum_log_interval_secs': 0}
    if loss in ('dpo', 'ipo'):
        settings['loss.beta'] = 0.1
    settings.update(overrides)
    config = compose_config(f'{k}={v}' for k, v in settings.items())
    train.check_config(config)
    os.makedirs(config.local_run_dir, exist_ok=True)
    policy, reference_model = train.build_models(config)
    trainer = trainers.BasicTrainer(policy, config, config.seed, config.local_run_dir, reference_model=reference_model)
    with torch.no_grad():  # move the policy away from the reference, reproducibly
        g = torch.Generator().manual_seed(0)
        for p in trainer.policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return trainer


def test_concatenated_forward_equals_separate_forwards(tmp_path):
    trainer = make_trainer(tmp_path)
    batch = next(iter(trainer.train_batches()))
    assert batch['chosen_input_ids'].shape[1] != batch['rejected_input_ids'].shape[1], 'want unequal padding'
    with torch.no_grad():
        chosen, rejected = trainer.concatenated_forward(batch)
        for kind, stats in (('chosen', chosen), ('rejected', rejected)):
            ids, mask, labels = (batch[f'{kind}_{k}'] for k in ('input_ids', 'attention_mask', 'labels'))
            want = trainers._tdpo_get_batch_logps(trainer.policy(ids, attention_mask=mask).logits,
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


@pytest.mark.parametrize('loss', ['tdpo', 'dpo', 'ipo'])
def test_preference_losses_log_reference_metric_names(tmp_path, loss):
    trainer = make_trainer(tmp_path, loss=loss)
    batch = next(iter(trainer.train_batches()))
    with torch.no_grad():
        mean_loss, metrics = trainer.get_batch_metrics(batch, train=True)
        chosen, rejected = trainer.concatenated_forward(batch)
    expected = {f'{group}_train/{name}' for group, names in (('rewards', ('chosen', 'rejected', 'accuracies', 'margins')),
                                                             ('kl', ('chosen', 'rejected', 'margin')),
                                                             ('logps', ('chosen', 'rejected'))) for name in names}
    assert expected | {'loss/train'} == set(metrics)
    assert all(len(v) == 4 for v in metrics.values())
    torch.testing.assert_close(torch.tensor(metrics['kl_train/chosen']), chosen.position_kl, rtol=1e-4, atol=1e-5)
    beta = trainer.config.loss.beta
    reward = chosen.logps_margin + (chosen.position_kl if loss == 'tdpo' else 0)
    torch.testing.assert_close(torch.tensor(metrics['rewards_train/chosen']), beta * reward, rtol=1e-4, atol=1e-5)
    assert mean_loss.item() == pytest.approx(sum(metrics['loss/train']) / 4, rel=1e-5)
