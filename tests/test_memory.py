"""memory.py on model=tiny in BasicTrainer, full fine-tuning and LoRA: `activation_checkpointing=true` really
checkpoints (the policy's blocks keep no activations for backward; the checkpointed forward runs once per block
and microbatch, never in the reference forward, evaluation or sampling), and changes no number: losses, metrics,
the gradient of every trainable parameter and an optimizer step after gradient accumulation equal those without
it, in every pair_layout and stats_impl; resume and export with it. Out of memory: the one-line advice, and
`python train.py` with an injected MemoryError / torch.OutOfMemoryError (one line, checkpoints kept, exit 1).
FSDPTrainer and TensorParallelTrainer: tests/dist_memory_worker.py under torchrun (test_distributed_exactness)."""
import os
import subprocess
import sys

import pytest
import torch
from transformers.modeling_layers import GradientCheckpointingLayer

import checkpoints
import memory
from helpers import CACHE, ROOT, TORCHRUN, compose_config, failure_report, make_trainer, torchrun_worker, write_hh_file

LORA = {'lora.r': 4, 'lora.alpha': 8}


@pytest.fixture(autouse=True, scope='module')
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


def count_checkpointed_forwards(model) -> list:
    """Wrap each checkpointing block's checkpoint function; the returned list grows by one per call."""
    calls = []
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            function = module._gradient_checkpointing_func
            module._gradient_checkpointing_func = lambda *a, _f=function, **k: (calls.append(1), _f(*a, **k))[1]
    return calls


def activation_bytes_saved(models, run):
    """(run(), bytes of tensors other than the weights of `models` that autograd saved for backward while it ran)."""
    weights = {p.untyped_storage().data_ptr() for model in models if model is not None for p in model.parameters()}
    total = [0]

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            total[0] += tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, total[0]


@pytest.mark.parametrize('use_lora', [False, True])
def test_the_key_checkpoints_every_block_and_keeps_no_block_activations(tmp_path, use_lora):
    extra = LORA if use_lora else {}
    plain = make_trainer(tmp_path / 'plain', **extra)
    checkpointed = make_trainer(tmp_path / 'ckpt', activation_checkpointing=True, **extra)
    n_blocks = plain.policy.config.num_hidden_layers
    assert memory.checkpointed_blocks(plain.policy) == 0 and memory.checkpointed_blocks(checkpointed.policy) == n_blocks
    batch = next(iter(plain.train_batches()))
    saved = {}
    for name, trainer in (('plain', plain), ('ckpt', checkpointed)):
        trainer.policy.train()
        _, saved[name] = activation_bytes_saved((trainer.policy, trainer.reference_model),
                                                lambda: trainer.get_batch_metrics(batch))
    # with checkpointing only what lies outside the blocks is kept (embeddings' output, final norm, the fused
    # statistics' rows); measured, full fine-tuning: 0.38 MB against 3.66 MB
    assert saved['ckpt'] < 0.15 * saved['plain'], saved


@pytest.mark.parametrize('use_lora', [False, True])
def test_checkpointing_changes_no_loss_gradient_or_update(tmp_path, use_lora):
    """Every pair_layout x stats_impl: the loss, every metric and the gradient of every trainable parameter
    with checkpointing equal those without (to float32 rounding); then one SGD update over
    2 accumulation steps gives the same weights."""
    extra = {'gradient_accumulation_steps': 2, 'lr': 0.1, **(LORA if use_lora else {})}
    plain = make_trainer(tmp_path / 'plain', **extra)
    checkpointed = make_trainer(tmp_path / 'ckpt', activation_checkpointing=True, **extra)
    calls = count_checkpointed_forwards(checkpointed.policy)
    batch = next(iter(plain.train_batches()))
    trainable = [(name, p, q) for (name, p), q in zip(plain.policy.named_parameters(), checkpointed.policy.parameters())
                 if p.requires_grad]
    assert trainable and all(q.requires_grad for _, _, q in trainable)
    for layout in ('padded', 'shared', 'packed'):
        for stats_impl in ('naive', 'chunked', 'fused'):
            results, calls_before = [], len(calls)
            for trainer in (plain, checkpointed):
                trainer.pair_layout, trainer.stats_impl = layout, stats_impl
                trainer.policy.train()
                trainer.optimizer.zero_grad(set_to_none=True)
                loss, metrics = trainer.get_batch_metrics(batch)
                loss.backward()
                results.append((loss.item(), metrics))
            # once per block (never in the reference forward nor in check_fused_stats's no-grad forwards)
            assert len(calls) - calls_before == plain.policy.config.num_hidden_layers, (layout, stats_impl)
            assert results[1][0] == pytest.approx(results[0][0], rel=1e-6, abs=1e-7), (layout, stats_impl)
            for key, values in results[0][1].items():
                assert results[1][1][key] == pytest.approx(values, rel=1e-5, abs=1e-6), (layout, stats_impl, key)
            for name, p, q in trainable:
                assert p.grad is not None and q.grad is not None, name
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=f'{layout} {stats_impl} {name}')
            assert any(p.grad.abs().max() > 1e-6 for _, p, _ in trainable)
    for trainer in (plain, checkpointed):
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.pair_layout, trainer.stats_impl = 'packed', 'fused'
    before = [p.detach().clone() for _, p, _ in trainable]
    del calls[:]
    plain.policy.train(), checkpointed.policy.train()
    plain.update(batch), checkpointed.update(batch)
    # one checkpointed forward per block and microbatch: not in the reference forward (LoRA: the same policy)
    assert len(calls) == 2 * plain.policy.config.num_hidden_layers
    moved = False
    for (name, p, q), p0 in zip(trainable, before):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)
        moved |= not torch.equal(p, p0)
    assert moved, 'the update should have moved the weights'
    assert checkpointed.pending_metrics['loss/train'] == pytest.approx(plain.pending_metrics['loss/train'], rel=1e-6)


@pytest.mark.parametrize('layout', ['padded', 'packed'])
def test_sft_with_checkpointing_gives_the_same_gradients(tmp_path, layout):
    plain = make_trainer(tmp_path / 'plain', loss='sft', pair_layout=layout)
    checkpointed = make_trainer(tmp_path / 'ckpt', loss='sft', pair_layout=layout, activation_checkpointing=True)
    calls = count_checkpointed_forwards(checkpointed.policy)
    batch = next(iter(plain.train_batches()))
    losses = []
    for trainer in (plain, checkpointed):
        assert trainer.pair_layout == layout
        trainer.policy.train()
        loss, _ = trainer.get_batch_metrics(batch)
        loss.backward()
        losses.append(loss.item())
    assert len(calls) == plain.policy.config.num_hidden_layers
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for (name, p), q in zip(plain.policy.named_parameters(), checkpointed.policy.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize('use_lora', [False, True])
def test_evaluation_and_sampling_run_without_checkpointing(tmp_path, use_lora):
    trainer = make_trainer(tmp_path, activation_checkpointing=True, n_eval_examples=4, eval_batch_size=4,
                           sample_during_eval=True, n_eval_model_samples=2, **(LORA if use_lora else {}))
    calls = count_checkpointed_forwards(trainer.policy)
    trainer.policy.train()  # as after an update: evaluate() must switch it off itself
    metrics = trainer.evaluate()
    assert calls == [] and 'loss/eval' in metrics
    with open(os.path.join(trainer.run_dir, 'samples.jsonl')) as f:
        assert len(f.readlines()) == 2
    batch = next(iter(trainer.train_batches()))
    trainer.policy.train()
    with trainer.reference_forward() as reference:  # LoRA: the training-mode policy with adapters off, no-grad
        reference(input_ids=batch['chosen_input_ids'], attention_mask=batch['chosen_attention_mask'])
    assert calls == []
    trainer.update(batch)
    assert len(calls) == trainer.policy.config.num_hidden_layers


@pytest.mark.parametrize('use_lora', [False, True])
def test_resume_and_export_with_checkpointing(tmp_path, use_lora):
    from transformers import AutoModelForCausalLM
    extra = {'activation_checkpointing': True, 'optimizer': 'AdamW', 'lr': 1e-3, **(LORA if use_lora else {})}
    trained = make_trainer(tmp_path / 'a', **extra)
    batch = next(iter(trained.train_batches()))
    trained.policy.train()
    trained.update(batch)
    trained.save()
    restored = make_trainer(tmp_path / 'b', **extra)
    restored.load_training_state(os.path.join(trained.run_dir, 'LATEST'))
    assert memory.checkpointed_blocks(restored.policy) == restored.policy.config.num_hidden_layers
    for (name, p), q in zip(trained.policy.state_dict().items(), restored.policy.state_dict().values()):
        assert torch.equal(p, q), name
    assert restored.optimizer.state_dict()['state'].keys() == trained.optimizer.state_dict()['state'].keys()
    trained.export_hf()
    exported = AutoModelForCausalLM.from_pretrained(os.path.join(trained.run_dir, 'hf')).eval()
    ids = batch['chosen_input_ids'][:2]
    trained.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained.policy(input_ids=ids).logits, rtol=1e-4, atol=1e-5)


def test_a_model_that_cannot_checkpoint_is_refused_with_one_line():
    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False
    with pytest.raises(memory.CheckpointingUnsupported, match='activation_checkpointing=true: NoCheckpointing does not'):
        memory.enable_activation_checkpointing(NoCheckpointing())


# ---- out of memory -------------------------------------------------------------------------------

def advice_config(**overrides):
    settings = {'model': 'tiny', 'loss': 'tdpo', 'exp_name': 'x', 'batch_size': 8, 'eval_batch_size': 16, **overrides}
    return compose_config(f'{k}={v}' for k, v in settings.items())


def raised(error):
    try:
        raise error
    except BaseException as e:
        return e


def test_out_of_memory_advice_names_what_to_change():
    line = memory.out_of_memory_advice(advice_config(), raised(MemoryError()), 0, 1, 1, None)
    assert line == ('out of memory: set activation_checkpointing=true or lora.r=16 or gradient_accumulation_steps=2 '
                    '(now 1) at the same batch_size=8; no checkpoint had been written yet')
    config = advice_config(activation_checkpointing=True, **{'lora.r': 8}, gradient_accumulation_steps=2)
    line = memory.out_of_memory_advice(config, raised(torch.OutOfMemoryError('CUDA out of memory.')), 1, 2, 2, '/r/step-8')
    assert line == ('CUDA out of memory on rank 1 of 2: set gradient_accumulation_steps=4 (now 2) at the same '
                    'batch_size=8; the checkpoints written so far are kept (newest: /r/step-8)')
    config = advice_config(gradient_accumulation_steps=4)  # 2 data-parallel ranks: one example per microbatch
    assert 'a smaller max_length (now 512)' in memory.out_of_memory_advice(config, raised(MemoryError()), 0, 2, 2, None)
    cpu_failure = raised(RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                                      "allocate memory: you tried to allocate 35184372088832 bytes."))
    assert all(map(memory.is_out_of_memory, (cpu_failure, MemoryError(), torch.OutOfMemoryError('x'))))
    assert not memory.is_out_of_memory(RuntimeError('shape mismatch'))

    def evaluate():
        raise MemoryError()
    line = memory.out_of_memory_advice(advice_config(), raised_in(evaluate), 0, 1, 1, None)
    assert line.startswith('out of memory during evaluation: set a smaller eval_batch_size (now 16) or '
                           'sample_during_eval=false;'), line


def raised_in(function):
    try:
        function()
    except BaseException as e:
        return e


INJECT = os.path.join(ROOT, 'tests', 'inject_oom.py')


@pytest.mark.parametrize('error', ['MemoryError', 'OutOfMemoryError'])
def test_train_py_out_of_memory_stops_with_one_line_and_keeps_checkpoints(tmp_path, error):
    """The 3rd update raises (injected in BasicTrainer.update): exit 1, one line naming the keys, no traceback,
    step-4 (written before) intact and nothing newer."""
    run_dir = str(tmp_path / 'run')
    args = ['model=tiny', f'local_dirs=[{CACHE}]', 'loss=tdpo', 'exp_name=oom', f'local_run_dir={run_dir}',
            f'datasets=[{write_hh_file(tmp_path / "pairs.jsonl")}]', 'batch_size=2', 'max_length=64',
            'max_prompt_length=32', 'n_eval_examples=0', 'n_examples=12', 'checkpoint_every=4', 'wandb.enabled=false']
    env = dict(os.environ, OMP_NUM_THREADS='1', INJECT_OOM=f'{error}:3')
    proc = subprocess.run([sys.executable, INJECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    lines = [line for line in out.splitlines() if 'out of memory' in line]
    prefix = 'CUDA out of memory' if error == 'OutOfMemoryError' else 'out of memory'
    assert lines == [f'{prefix}: set activation_checkpointing=true or lora.r=16 or gradient_accumulation_steps=2 (now 1) '
                     f'at the same batch_size=2; the checkpoints written so far are kept (newest: {run_dir}/step-4)'], out[-4000:]
    assert 'Traceback' not in out, out[-4000:]
    assert sorted(d for d in os.listdir(run_dir) if d.startswith(('step-', 'LATEST'))) == ['step-4']
    assert checkpoints.verify(os.path.join(run_dir, 'step-4')) == 4


# ---- FSDPTrainer and TensorParallelTrainer -------------------------------------------------------

def test_distributed_exactness(tmp_path):
    """tests/dist_memory_worker.py: FSDP (full, LoRA) and tensor parallelism; packed, padded and shared rows; 2 CPU ranks."""
    write_hh_file(tmp_path / 'pairs.jsonl')
    proc = torchrun_worker('dist_memory_worker.py', tmp_path, timeout=900)
    assert proc.returncode == 0, failure_report(proc.stdout + proc.stderr)
    assert proc.stdout.count('memory ok') == 18, proc.stdout  # 3 trainers x 3 (layout, stats_impl) x 2 ranks


def test_out_of_memory_on_one_rank_under_torchrun_stops_every_rank(tmp_path):
    """FSDPTrainer, 2 ranks, rank 1 runs out at its 3rd update: it says so in one line; rank 0, waiting for it
    in a collective, fails there as its peer's connection closes (gloo), so no rank waits; step-8 is intact."""
    import time
    run_dir = str(tmp_path / 'run')
    args = ['model=tiny', f'local_dirs=[{CACHE}]', 'loss=tdpo', 'exp_name=oom', f'local_run_dir={run_dir}',
            f'datasets=[{write_hh_file(tmp_path / "pairs.jsonl")}]', 'batch_size=4', 'max_length=64',
            'max_prompt_length=32', 'n_eval_examples=0', 'n_examples=16', 'checkpoint_every=8', 'wandb.enabled=false',
            'trainer=FSDPTrainer']
    start = time.time()
    proc = subprocess.run([*TORCHRUN, INJECT, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1', INJECT_OOM='OutOfMemoryError:3:1'))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and time.time() - start < 240, out[-4000:]
    lines = [line[line.index('CUDA out of memory'):] for line in out.splitlines() if 'out of memory' in line]
    assert lines == ['CUDA out of memory on rank 1 of 2: set activation_checkpointing=true or lora.r=16 or '
                     'gradient_accumulation_steps=2 (now 1) at the same batch_size=4; the checkpoints written so far '
                     f'are kept (newest: {run_dir}/step-8)'], out[-4000:]
    assert sorted(d for d in os.listdir(run_dir) if d.startswith(('step-', 'LATEST'))) == ['step-8']
    assert checkpoints.verify(os.path.join(run_dir, 'step-8')) == 8
