"""Run by tests/test_distributed.py under torchrun (2 processes): for FSDPTrainer, TensorParallelTrainer
and FSDPTrainer with LoRA (whose sharded checkpoint must hold only the adapter and its optimizer state), one
AdamW update, `save`, then a fresh trainer's `load_training_state` must restore the same full weights,
optimizer state, scheduler and step. Prints 'checkpoint ok' per rank."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

import distributed
import train
from helpers import CACHE, compose_config


def full_state(trainer):
    return get_state_dict(trainer.policy, trainer.optimizer, options=StateDictOptions(full_state_dict=True))


def assert_equal(a, b, where=''):
    if isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            assert_equal(a[k], b[k], f'{where}.{k}')
    elif torch.is_tensor(a):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=where)
    else:
        assert a == b, (where, a, b)


def main(tmp_dir):
    distributed.init_distributed(int(os.environ['RANK']), int(os.environ['WORLD_SIZE']))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for trainer_name, lora_r in (('FSDPTrainer', None), ('TensorParallelTrainer', None), ('FSDPTrainer', 4)):
        run_dir = os.path.join(tmp_dir, f'{trainer_name}_lora{lora_r}')
        os.makedirs(run_dir, exist_ok=True)
        config = compose_config([
            'model=tiny', f'local_dirs=[{CACHE}]', 'loss=tdpo', 'exp_name=ckpt', f'trainer={trainer_name}',
            f'datasets=[{tmp_dir}/pairs.jsonl]', f'local_run_dir={run_dir}', 'batch_size=4', 'max_length=64',
            'max_prompt_length=32', 'n_eval_examples=0', 'n_examples=4', 'optimizer=AdamW', 'lr=1e-3',
            'wandb.enabled=false', 'warmup_steps=3', f'lora.r={"null" if lora_r is None else lora_r}'])
        train.check_config(config, world_size)

        def make_trainer():
            policy, reference_model = train.build_models(config)
            return train.TRAINERS[trainer_name](policy, config, config.seed, run_dir,
                                                reference_model=reference_model, rank=rank, world_size=world_size)
        trained = make_trainer()
        trained.train()
        trained.save()
        restored = make_trainer()
        restored.load_training_state(os.path.join(run_dir, 'LATEST'))
        (policy_a, optim_a), (policy_b, optim_b) = full_state(trained), full_state(restored)
        assert optim_a['state'], 'AdamW should have state after an update'
        assert_equal(policy_a, policy_b, 'policy')
        assert_equal(optim_a, optim_b, 'optimizer')
        assert restored.scheduler.state_dict() == trained.scheduler.state_dict()
        assert (restored.example_counter, restored.batch_counter) == (4, 1)
        if lora_r:  # with LoRA the sharded checkpoint holds only the adapter and its optimizer state
            import torch.distributed.checkpoint as dcp
            saved = dcp.FileSystemReader(os.path.join(run_dir, 'LATEST', 'sharded')).read_metadata().state_dict_metadata
            tensors = [key for key in saved if not key.startswith('optimizer.param_groups.')]
            # 28 adapter weights, and their AdamW exp_avg, exp_avg_sq and step
            assert len(tensors) == 4 * 28 and all('.lora_' in key for key in tensors), sorted(tensors)[:5]
        print(f'{trainer_name} lora.r={lora_r} rank {rank}: checkpoint ok', flush=True)
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
