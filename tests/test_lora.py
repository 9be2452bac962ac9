"""LoRA (lora.r set) on model=tiny: the invariants (before training the policy is the reference: SeqKL 0,
loss log 2; the reference with adapters off is the base model exactly; one update equals the update
computed through a model whose weights are W + (α/r)·B A, merged by hand), every loss and stats_impl,
gradient accumulation, adapter-only checkpoints and their exact reload, the merge against peft's own,
config errors; and `python train.py ... lora.r=4` end to end: from a full SFT archive, SIGUSR1 and resume
(bitwise equal to an uninterrupted run), the adapter/ and merged hf/ exports, evaluate.py on each."""
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys

import pytest
import torch
from torch.func import functional_call

import lora
import losses
import model_loading
import models
import pair_layout
import run_config
import sharded_trainers
import trainers
from helpers import CACHE, ROOT, compose_config, make_trainer, write_hh_file

R, ALPHA = 4, 8  # scaling α / r = 2, so that a wrong scale shows


@pytest.fixture(autouse=True, scope='module')
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def lora_trainer(tmp_path, loss='tdpo', **overrides):
    """A BasicTrainer with a LoRA policy on model=tiny, base weights as loaded (not perturbed)."""
    return make_trainer(tmp_path, loss=loss, perturb=False, **{'lora.r': R, 'lora.alpha': ALPHA, **overrides})


def adapter_layers(policy):
    """(base weight name, LoRA layer) of every adapted linear layer."""
    return [(name[len(lora.PEFT_PREFIX):] + '.weight', module) for name, module in policy.named_modules()
            if isinstance(module, __import__('peft').tuners.lora.LoraLayer)]


def randomize_b(policy, std=0.05, seed=1):
    """B = 0 at initialisation makes the adapter invisible; give it values, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapter_layers(policy):
            weight = layer.lora_B[lora.ADAPTER].weight
            weight.copy_(torch.randn(weight.shape, generator=g) * std)


def base_model(trainer):
    """The policy's base model, loaded again from the run's config without LoRA."""
    return model_loading.load_model(trainer.config.model, trainer.config.model.policy_dtype, CACHE).eval()


def inputs(batch):
    concatenated = pair_layout.concatenated_inputs(batch)
    return (concatenated[f'concatenated_{k}'] for k in ('input_ids', 'attention_mask', 'labels'))


# ---- invariants ---------------------------------------------------------------------------------

@pytest.mark.parametrize('stats_impl', ['naive', 'chunked', 'fused'])
@pytest.mark.parametrize('loss', ['tdpo', 'dpo'])
def test_before_training_the_policy_is_the_reference(tmp_path, stats_impl, loss):
    trainer = lora_trainer(tmp_path, loss=loss, stats_impl=stats_impl)
    assert trainer.reference_model is None and trainer.stats_impl == stats_impl
    assert all(not layer.lora_B[lora.ADAPTER].weight.any() for _, layer in adapter_layers(trainer.policy))
    with torch.no_grad():
        loss_value, metrics = trainer.get_batch_metrics(next(iter(trainer.train_batches())))
    assert metrics['kl_train/chosen'] == [0.0] * 4 and metrics['kl_train/rejected'] == [0.0] * 4
    assert metrics['rewards_train/margins'] == [0.0] * 4
    assert loss_value.item() == pytest.approx(math.log(2), abs=1e-7)


def test_reference_with_adapters_off_is_the_base_model_exactly(tmp_path):
    trainer = lora_trainer(tmp_path)
    randomize_b(trainer.policy)
    ids, mask, _ = inputs(next(iter(trainer.train_batches())))
    base = base_model(trainer)
    with torch.no_grad():
        policy_logits = trainer.policy(ids, attention_mask=mask).logits
        with trainer.reference_forward() as reference:
            reference_logits = reference(ids, attention_mask=mask).logits
            assert not torch.is_grad_enabled()
        base_logits = base(ids, attention_mask=mask).logits
        after = trainer.policy(ids, attention_mask=mask).logits
    assert torch.equal(reference_logits, base_logits)
    assert not torch.allclose(policy_logits, base_logits, atol=1e-3), 'the adapter should change the policy'
    assert torch.equal(after, policy_logits), 'the adapters must be back on after the reference forward'
    assert all(p.requires_grad for p in trainer.optimizer.param_groups[0]['params'])


@pytest.mark.parametrize('stats_impl', ['naive', 'chunked', 'fused'])
def test_one_update_equals_the_update_through_a_hand_merged_model(tmp_path, stats_impl):
    """SGD (lr 1, no clipping): the trainer's loss, adapter gradients and updated adapter against the TDPO2
    loss of a plain model whose adapted weights are W + (α/r)·B A (A, B leaves), reference = the plain model."""
    trainer = lora_trainer(tmp_path, stats_impl=stats_impl)
    randomize_b(trainer.policy)
    batch = next(iter(trainer.train_batches()))
    layers = adapter_layers(trainer.policy)
    assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down)

    base = base_model(trainer)
    leaves = {name: (layer.lora_A[lora.ADAPTER].weight.detach().clone().requires_grad_(),
                     layer.lora_B[lora.ADAPTER].weight.detach().clone().requires_grad_()) for name, layer in layers}
    weights = dict(base.named_parameters())
    merged = {name: weights[name].detach() + (ALPHA / R) * b @ a for name, (a, b) in leaves.items()}
    ids, mask, labels = inputs(batch)
    logits = functional_call(base, merged, (ids,), {'attention_mask': mask}).logits
    with torch.no_grad():
        reference_logits = base(ids, attention_mask=mask).logits
    margin, kl, _ = losses.tdpo_get_batch_logps(logits, reference_logits, labels)
    n = batch['chosen_input_ids'].shape[0]
    c = trainer.config.loss
    expected_loss = trainers.tdpo_loss(margin[:n], margin[n:], kl[:n], kl[n:], c.beta, c.alpha, c.if_tdpo2)[0].mean()
    expected_loss.backward()

    loss, _ = trainer.get_batch_metrics(batch)
    loss.backward()
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    before = {name: (layer.lora_A[lora.ADAPTER].weight.detach().clone(), layer.lora_B[lora.ADAPTER].weight.detach().clone())
              for name, layer in layers}
    for name, layer in layers:
        (a, b), got_a, got_b = leaves[name], layer.lora_A[lora.ADAPTER].weight.grad, layer.lora_B[lora.ADAPTER].weight.grad
        assert a.grad.abs().max() > 1e-6 and b.grad.abs().max() > 1e-6
        torch.testing.assert_close(got_a, a.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(got_b, b.grad, rtol=1e-4, atol=1e-7)
    assert not any(p.grad is not None for n, p in trainer.policy.named_parameters() if 'lora_' not in n)

    trainer.policy.zero_grad()
    trainer.update(batch)
    lr = trainer.config.lr
    for name, layer in layers:
        (a, b), (a0, b0) = leaves[name], before[name]
        torch.testing.assert_close(layer.lora_A[lora.ADAPTER].weight, a0 - lr * a.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(layer.lora_B[lora.ADAPTER].weight, b0 - lr * b.grad, rtol=1e-4, atol=1e-6)


# ---- training ----------------------------------------------------------------------------------

@pytest.mark.parametrize('loss', ['tdpo', 'dpo', 'ipo', 'sft'])
def test_every_loss_trains_the_adapter_and_nothing_else(tmp_path, loss):
    trainer = lora_trainer(tmp_path, loss=loss, optimizer='AdamW', lr=1e-2)
    before = {k: v.clone() for k, v in trainer.policy_state_dict(trainable_only=False).items()}
    trainer.train()
    after = trainer.policy_state_dict(trainable_only=False)
    adapter = {k for k in before if '.lora_' in k}
    assert len(adapter) == 28 and len(trainer.optimizer.state) == 28
    assert all(torch.equal(before[k], after[k]) for k in before if k not in adapter), 'a base weight changed'
    assert all(not torch.equal(before[k], after[k]) for k in adapter if '.lora_B.' in k), 'B did not train'


def test_batch_of_4_equals_2_accumulation_steps_of_2(tmp_path):
    results = []
    for accumulation in (1, 2):
        trainer = lora_trainer(tmp_path / str(accumulation), gradient_accumulation_steps=accumulation)
        randomize_b(trainer.policy)
        trainer.train()
        results.append(trainer.policy_state_dict())
    assert set(results[0]) == set(results[1]) and all('.lora_' in k for k in results[0])
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-4, atol=1e-6)


def test_fused_statistics_need_an_output_layer_without_adapter(tmp_path):
    assert lora_trainer(tmp_path / 'a').stats_impl == 'fused'
    trainer = lora_trainer(tmp_path / 'b', **{'lora.target_modules': '[q_proj,v_proj,lm_head]',
                                              '+model.random_init.tie_word_embeddings': 'false'})
    assert trainer.stats_impl == 'chunked'
    assert {name.split('.')[-2] for name, _ in adapter_layers(trainer.policy)} == {'q_proj', 'v_proj', 'lm_head'}


# ---- checkpoints and export --------------------------------------------------------------------

def test_checkpoint_holds_only_the_adapter_and_its_optimizer_state(tmp_path):
    trainer = lora_trainer(tmp_path, optimizer='AdamW', lr=1e-2, n_examples=8)
    trainer.update(next(iter(trainer.train_batches())))
    trainer.save()
    checkpoint = os.path.join(trainer.run_dir, 'LATEST')
    load = lambda name: torch.load(os.path.join(checkpoint, name), weights_only=True)
    policy, optimizer = load('policy.pt')['state'], load('optimizer.pt')['state']
    assert len(policy) == 28 and all('.lora_A.' in k or '.lora_B.' in k for k in policy)
    assert len(optimizer['state']) == 28 and len(optimizer['param_groups'][0]['params']) == 28
    full_bytes = sum(v.numel() * v.element_size() for v in trainer.policy.state_dict().values())
    assert os.path.getsize(os.path.join(checkpoint, 'policy.pt')) < 0.1 * full_bytes

    restored = lora_trainer(tmp_path / 'restored', optimizer='AdamW', lr=1e-2, n_examples=8)
    restored.load_training_state(checkpoint)
    assert (restored.example_counter, restored.batch_counter) == (4, 1)
    for k, v in trainer.policy_state_dict(trainable_only=False).items():
        assert torch.equal(restored.policy_state_dict(trainable_only=False)[k], v), k
    want, got = trainer.optimizer.state_dict(), restored.optimizer.state_dict()
    for i, state in want['state'].items():
        assert all(torch.equal(got['state'][i][k], v) for k, v in state.items())

    full = make_trainer(tmp_path / 'full', optimizer='AdamW', lr=1e-2)  # full fine-tuning: its checkpoint does not fit
    full.save()
    with pytest.raises(RuntimeError, match='does not fit this policy'):
        restored.load_training_state(os.path.join(full.run_dir, 'LATEST'))


def tiny_gpt2():
    import transformers
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize('arch', ['llama', 'gpt2'])
def test_merged_state_dict_equals_peft_merge_and_unload(tmp_path, arch):
    """lora.merged_state_dict (a pure function of the state dict, also used on FSDP-gathered weights) against
    peft's own merge; GPT-2's Conv1D layers store W transposed (fan_in_fan_out)."""
    if arch == 'llama':
        policy = lora_trainer(tmp_path).policy
    else:
        policy = lora.wrap(tiny_gpt2(), compose_config(['exp_name=x', f'lora.r={R}', f'lora.alpha={ALPHA}']).lora, seed=0)
    randomize_b(policy)
    config = policy.peft_config[lora.ADAPTER]
    assert config.fan_in_fan_out == (arch == 'gpt2')
    merged = lora.merged_state_dict(policy.state_dict(), ALPHA / R, config.fan_in_fan_out)
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert set(merged) == set(expected)
    changed = 0
    for k, v in expected.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-5, atol=1e-6)
        changed += not torch.equal(v, policy.get_base_model().state_dict().get(k.replace('.weight', '.base_layer.weight'), v))
    assert changed >= 4


# ---- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize('override, message', [
    ('lora.r=0', 'lora.r must be null (full fine-tuning) or a positive integer'),
    ('lora.r=2.5', 'lora.r must be null'),
    ('lora.alpha=0', 'lora.alpha must be positive'),
    ('lora.dropout=1.0', 'lora.dropout must be in [0, 1)'),
    ('lora.target_modules=[]', 'lora.target_modules is empty'),
    ('trainer=TensorParallelTrainer', 'does not train LoRA adapters; use BasicTrainer, FSDPTrainer'),
])
def test_bad_lora_settings_are_config_errors(override, message):
    config = compose_config(['model=tiny', 'loss=tdpo', 'exp_name=x', 'lora.r=4', override])
    with pytest.raises(run_config.ConfigError, match=re.escape(message)):
        run_config.check_config(config, trainers=sharded_trainers.TRAINERS)


@pytest.mark.parametrize('targets, message', [('[q_proj,nope]', 'lora: lora.target_modules: no module of LlamaForCausalLM '
                                                                 'is named nope'),
                                              ('[nope]', 'lora: Target modules'),
                                              ('[q_proj,lm_head]', 'ties to its input embedding')])
def test_targets_the_model_cannot_take_are_config_errors(targets, message):
    config = compose_config(['model=tiny', 'loss=tdpo', 'exp_name=x', 'lora.r=4', f'local_dirs=[{CACHE}]',
                             f'lora.target_modules={targets}'])
    with pytest.raises(run_config.ConfigError, match=message):
        models.build_models(config, sharded_trainers.TRAINERS[config.trainer])


def test_an_adapter_archive_is_a_clear_config_error(tmp_path):
    trainer = lora_trainer(tmp_path)
    trainer.save()
    archive = os.path.join(trainer.run_dir, 'LATEST', 'policy.pt')
    proc = subprocess.run([sys.executable, 'train.py', 'model=tiny', f'local_dirs=[{CACHE}]', 'loss=tdpo', 'exp_name=x',
                           f'datasets=[{tmp_path / "pairs.jsonl"}]', f'local_run_dir={tmp_path / "run2"}',
                           f'model.archive={archive}', 'wandb.enabled=false'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode != 0 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert 'holds a LoRA adapter, not full weights' in proc.stderr and 'model.name_or_path=<run dir>/hf' in proc.stderr


# ---- end to end: python train.py ... lora.r=4 ---------------------------------------------------

E2E = ['model=tiny', f'local_dirs=[{CACHE}]', 'loss=tdpo', f'lora.r={R}', f'lora.alpha={ALPHA}', 'batch_size=2',
       'eval_batch_size=4', 'max_length=48', 'max_prompt_length=24', 'n_examples=16', 'eval_every=8',
       'n_eval_examples=4', 'eval_fraction=0.25', 'checkpoint_every=4', 'n_eval_model_samples=2', 'optimizer=AdamW',
       'lr=1e-2', 'warmup_steps=2', 'minimum_log_interval_secs=0', 'wandb.enabled=false', 'exp_name=lora_e2e']


def run_script(script, *args, expect=0):
    proc = subprocess.run([sys.executable, '-u', script, *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == expect, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def without_timing(run_dir):
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [{k: v for k, v in json.loads(line).items() if k != 'examples_per_second'} for line in f]


@pytest.fixture(scope='module')
def sft_archive(tmp_path_factory):
    """A full SFT checkpoint's policy.pt (the format train.py writes): the tiny model moved off its init."""
    path = tmp_path_factory.mktemp('sft') / 'policy.pt'
    model = model_loading.load_model(compose_config(['model=tiny', 'exp_name=x']).model, 'float32', CACHE)
    g = torch.Generator().manual_seed(2)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    torch.save({'step_idx': 64, 'state': state, 'metrics': {}}, path)
    return str(path), state


def test_train_resume_export_and_evaluate(tmp_path, sft_archive):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from test_reliability import wait_for_step
    archive, sft_state = sft_archive
    data = write_hh_file(tmp_path / 'pairs.jsonl')
    args = [*E2E, f'datasets=[{data}]', f'model.archive={archive}']
    full = str(tmp_path / 'full')
    run_script('train.py', *args, f'local_run_dir={full}')

    # stop on SIGUSR1 after a few updates, then resume=true: the same run, bit for bit
    stopped = str(tmp_path / 'stopped')
    proc = subprocess.Popen([sys.executable, '-u', 'train.py', *args, f'local_run_dir={stopped}'], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    wait_for_step(proc, stopped, 6)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 75, out[-3000:]
    assert 'resumed from' in run_script('train.py', *args, f'local_run_dir={stopped}', 'resume=true')
    assert without_timing(stopped) == without_timing(full)
    adapter = {}
    for run_dir in (full, stopped):
        adapter[run_dir] = torch.load(os.path.join(run_dir, 'LATEST', 'policy.pt'), weights_only=True)['state']
    assert len(adapter[full]) == 28 and all('.lora_' in k for k in adapter[full])
    assert all(torch.equal(adapter[full][k], adapter[stopped][k]) for k in adapter[full])

    # the SFT archive is policy and reference at the start: SeqKL 0 and loss log 2
    first_eval = without_timing(full)[0]
    assert first_eval['split'] == 'eval' and first_eval['step'] == 0
    assert first_eval['kl_eval/chosen'] == 0 and first_eval['kl_eval/rejected'] == 0
    assert first_eval['loss/eval'] == pytest.approx(math.log(2), abs=1e-6)
    assert without_timing(full)[-1]['kl_eval/chosen'] > 0

    # exports: the adapter on the SFT weights (peft) and the merged model (transformers) give the trained policy
    base = model_loading.load_model(compose_config(['model=tiny', 'exp_name=x']).model, 'float32', CACHE)
    base.load_state_dict(sft_state)
    with_adapter = PeftModel.from_pretrained(copy.deepcopy(base), os.path.join(full, 'adapter')).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(full, 'hf')).eval()
    trained = lora.wrap(copy.deepcopy(base), compose_config(['exp_name=x', f'lora.r={R}', f'lora.alpha={ALPHA}']).lora, 0)
    lora.load_trainable_state(trained, adapter[full], 'LATEST')
    ids = torch.randint(0, 1000, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained(ids).logits
        assert torch.equal(with_adapter(ids).logits, want)
        torch.testing.assert_close(merged(ids).logits, want, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(base(ids).logits, want, atol=1e-3)
    assert json.load(open(os.path.join(full, 'adapter', 'adapter_config.json')))['base_model_name_or_path'] == ''

    # evaluate.py takes the run (its merged hf/), the adapter/ and the adapter-only checkpoint: the same model
    policies = f'{full},{full}/adapter,{full}/LATEST'
    run_script('evaluate.py', '-m', f'policy={policies}', 'reference=model:tiny', f'prompts={data}', 'n_prompts=2',
               'samples_per_prompt=2', 'max_new_tokens=6', 'batch_size=8', f'hydra.sweep.dir={tmp_path}/multirun',
               'score_reference=false')
    merged_eval, adapter_eval, checkpoint_eval = (json.loads(open(os.path.join(full, d, 'eval.json')).read())
                                                  for d in ('', 'adapter', 'LATEST'))
    assert merged_eval['policy'].endswith('/hf') and adapter_eval['policy'].endswith('/adapter')
    for result in (adapter_eval, checkpoint_eval):
        assert result['examples_seen'] == merged_eval['examples_seen'] == 16
        assert result['kl'] == pytest.approx(merged_eval['kl'], abs=1e-4)
        assert result['policy_reward'] == merged_eval['policy_reward']
