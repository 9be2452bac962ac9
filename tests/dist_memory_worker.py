"""Run by tests/test_memory.py under torchrun (2 processes): for FSDPTrainer, FSDPTrainer with LoRA and
TensorParallelTrainer, each with packed rows (fused statistics), padded rows (chunked) and shared rows (naive), a trainer with activation_checkpointing=true
against one without, built alike: the same loss and metrics, the same gradient of every trainable parameter
(gathered whole), the same weights after an AdamW step, and after a further update over 2 accumulation steps;
the checkpointed forward ran once per block and microbatch. Prints 'memory ok' per case and rank."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import distributed
import memory
import train
import utils
from helpers import CACHE, compose_config
from test_memory import count_checkpointed_forwards


def whole(tensor):
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def make_trainer(tmp_dir, trainer_name, lora_r, layout, stats_impl, checkpointing, rank, world_size):
    run_dir = os.path.join(tmp_dir, f'{trainer_name}_{lora_r}_{layout}_{stats_impl}_{checkpointing}')
    os.makedirs(run_dir, exist_ok=True)
    config = compose_config([
        'model=tiny', f'local_dirs=[{CACHE}]', 'loss=tdpo', 'exp_name=mem', f'trainer={trainer_name}',
        f'datasets=[{tmp_dir}/pairs.jsonl]', f'local_run_dir={run_dir}', 'batch_size=4', 'max_length=64',
        'max_prompt_length=32', 'n_eval_examples=0', 'n_examples=4', 'optimizer=AdamW', 'lr=1e-3', 'warmup_steps=0',
        'wandb.enabled=false', 'gradient_accumulation_steps=2', f'pair_layout={layout}', f'stats_impl={stats_impl}',
        f'activation_checkpointing={checkpointing}', f'lora.r={"null" if lora_r is None else lora_r}'])
    train.check_config(config, world_size)
    policy, reference_model = train.build_models(config)
    with torch.no_grad():  # move the policy away from the reference (and LoRA's B from 0), alike on every rank
        g = torch.Generator().manual_seed(0)
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return train.TRAINERS[trainer_name](policy, config, config.seed, run_dir, reference_model=reference_model,
                                        rank=rank, world_size=world_size)


def check(tmp_dir, trainer_name, lora_r, layout, stats_impl, rank, world_size):
    plain, checkpointed = (make_trainer(tmp_dir, trainer_name, lora_r, layout, stats_impl, c, rank, world_size)
                           for c in (False, True))
    blocks = checkpointed.policy.config.num_hidden_layers
    assert memory.checkpointed_blocks(plain.policy) == 0 and memory.checkpointed_blocks(checkpointed.policy) == blocks
    calls = count_checkpointed_forwards(checkpointed.policy)
    batch = next(iter(plain.train_batches()))
    microbatch = utils.slice_batch(utils.slice_batch(batch, 0, 2), plain.data_rank, plain.data_world_size)
    results = []
    for trainer in (plain, checkpointed):
        assert (trainer.pair_layout, trainer.stats_impl) == (layout, stats_impl)
        trainer.policy.train()
        loss, metrics = trainer.get_batch_metrics(utils.move_batch(microbatch, trainer.device))
        loss.backward()
        results.append((loss.item(), metrics))
    assert len(calls) == blocks, len(calls)
    assert abs(results[0][0] - results[1][0]) <= 1e-6 * (1 + abs(results[0][0])), results
    for key, values in results[0][1].items():
        torch.testing.assert_close(torch.tensor(results[1][1][key]), torch.tensor(values), rtol=1e-5, atol=1e-6, msg=key)
    pairs = [(name, p, q) for (name, p), q in zip(plain.policy.named_parameters(), checkpointed.policy.parameters())
             if p.requires_grad]
    assert pairs
    for name, p, q in pairs:
        torch.testing.assert_close(whole(q.grad), whole(p.grad), rtol=1e-5, atol=1e-7, msg=name)
    for trainer in (plain, checkpointed):
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
    for name, p, q in pairs:
        torch.testing.assert_close(whole(q), whole(p), rtol=1e-5, atol=1e-7, msg=f'after a step: {name}')
    del calls[:]
    for trainer in (plain, checkpointed):
        trainer.update(batch)
    assert len(calls) == 2 * blocks, len(calls)
    for name, p, q in pairs:
        torch.testing.assert_close(whole(q), whole(p), rtol=1e-5, atol=1e-6, msg=f'after an accumulated update: {name}')
    print(f'{trainer_name} lora.r={lora_r} {layout} {stats_impl} rank {rank}: memory ok', flush=True)


def main(tmp_dir):
    distributed.init_distributed(int(os.environ['RANK']), int(os.environ['WORLD_SIZE']))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for trainer_name, lora_r in (('FSDPTrainer', None), ('FSDPTrainer', 4), ('TensorParallelTrainer', None)):
        for layout, stats_impl in (('packed', 'fused'), ('padded', 'chunked'), ('shared', 'naive')):
            check(tmp_dir, trainer_name, lora_r, layout, stats_impl, rank, world_size)
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
