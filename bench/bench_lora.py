"""Why this script exists: to say what LoRA saves in a TDPO training step. It measures one full
step of the real trainer (`BasicTrainer.update`: policy forward and backward, reference forward, TDPO2
loss, AdamW step) on SmolLM2-135M-Instruct (model=smollm2-135m, the real weights), full fine-tuning
against LoRA (lora.r; the reference is then the policy with its adapters off), side by side in one run:

  full   policy + frozen reference copy (float32), gradients and AdamW state for every weight
  lora   one copy of the weights; gradients and AdamW state for the adapters only

Each (length, variant) runs in a fresh subprocess so that peak memory is its own: the process's peak
RSS during the timed steps (VmHWM, reset after the warm-up steps, so the AdamW state exists and one-time
compilation is excluded), and CPU time per step (steadier than wall clock on a shared machine). Ratios
are against full fine-tuning measured in the same run.

  python bench/bench_lora.py --pairs 2 --length 128 --length 512 --steps 2 --warmup 1 --out bench/results-lora-cpu.json
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_tdpo_step import make_batch, run_worker, write_results  # noqa: E402 (the bench/ folder is not a package)
VARIANTS = ('full', 'lora')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--pairs', type=int, default=2, help='preference pairs per step (2 sequences each)')
    p.add_argument('--length', type=int, action='append', help='tokens per sequence; repeatable; default 512')
    p.add_argument('--prompt-length', type=int, default=None, help='prompt tokens; default length // 4')
    p.add_argument('--lora-r', type=int, default=16)
    p.add_argument('--model', default='smollm2-135m', help='config/model/ name')
    p.add_argument('--stats-impl', default='fused')
    p.add_argument('--steps', type=int, default=2, help='timed steps (median reported)')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps first (AdamW state, torch.compile)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--out', default=None, help='JSON file for all results')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_pairs(path, n=8):
    """n HH-format rows with distinct prompts; chosen answers are longer and polite (the steps time random
    tokens: these rows only make the config's data set)."""
    with open(path, 'w') as f:
        for i in range(n):
            prompt = f'\n\nHuman: Tell me something about the number {i}.\n\nAssistant:'
            f.write(json.dumps({'chosen': prompt + f' Gladly! {i} is a fine number, {i % 7} more than a multiple of 7.',
                                'rejected': prompt + ' No.'}) + '\n')
    return str(path)


def make_trainer(args, variant, run_dir):
    """The trainer train.py would build for `model=<model> loss=tdpo optimizer=AdamW [lora.r=...]`."""
    sys.path.insert(0, ROOT)
    from run_config import compose_config
    import train
    import trainers
    overrides = [f'model={args.model}', 'loss=tdpo', 'exp_name=bench_lora', 'optimizer=AdamW', 'lr=1e-5',
                 'warmup_steps=0', f'batch_size={args.pairs}', f'local_dirs=[{os.path.join(ROOT, ".cache")}]',
                 f'datasets=[{write_pairs(os.path.join(run_dir, "pairs.jsonl"))}]', f'local_run_dir={run_dir}',
                 'n_eval_examples=0', 'wandb.enabled=false', f'stats_impl={args.stats_impl}',
                 f'lora.r={args.lora_r if variant == "lora" else "null"}',
                 'pair_layout=padded']  # the synthetic pairs share no prompt; layouts: bench_tdpo_step.py --layouts
    config = compose_config(overrides)
    train.check_config(config)
    policy, reference_model = train.build_models(config)
    return trainers.BasicTrainer(policy, config, config.seed, run_dir, reference_model=reference_model)


def make_pair_batch(args, length, vocab):
    """`pairs` chosen and `pairs` rejected sequences of `length` tokens (ragged responses), as the trainer's
    batches hold them; the same random tokens as bench_tdpo_step.py."""
    shape = types.SimpleNamespace(batch=2 * args.pairs, length=length, prompt_length=args.prompt_length or length // 4)
    ids, mask, labels = make_batch(shape, vocab, 'cpu')
    batch = {'prompt': [''] * args.pairs}
    for half, rows in (('chosen', slice(0, args.pairs)), ('rejected', slice(args.pairs, None))):
        batch.update({f'{half}_input_ids': ids[rows], f'{half}_attention_mask': mask[rows], f'{half}_labels': labels[rows]})
    return batch


def worker(args, variant, length):
    import torch
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = make_trainer(args, variant, run_dir)
        batch = make_pair_batch(args, length, trainer.policy.get_input_embeddings().weight.shape[0])
        trainer.policy.train()
        for _ in range(args.warmup):
            trainer.update(batch)
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM (peak RSS) to the current RSS
        times, cpu_times = [], []
        for _ in range(args.steps):
            start, cpu_start = time.perf_counter(), time.process_time()
            trainer.update(batch)
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        peak = int(open('/proc/self/status').read().split('VmHWM:')[1].split()[0]) * 1024
        params = list(trainer.policy.parameters())
        optimizer_bytes = sum(t.numel() * t.element_size() for s in trainer.optimizer.state.values()
                              for t in s.values() if torch.is_tensor(t))
        result = dict(variant=variant, length=length, pairs=args.pairs, step_s=statistics.median(times), times_s=times,
                      cpu_s=statistics.median(cpu_times), peak_bytes=peak,
                      ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      trainable_params=sum(p.numel() for p in params if p.requires_grad),
                      total_params=sum(p.numel() for p in params), optimizer_state_bytes=optimizer_bytes,
                      reference_copy=trainer.reference_model is not None, stats_impl=trainer.stats_impl,
                      loadavg_1min_after=os.getloadavg()[0])
    print('RESULT ' + json.dumps(result), flush=True)


def main():
    args = parse_args()
    args.length = args.length or [512]
    if args.worker:
        variant, length = args.worker.split(':')
        return worker(args, variant, int(length))
    results = []
    for length in args.length:
        for variant in VARIANTS:
            cmd = [sys.executable, os.path.abspath(__file__), '--worker', f'{variant}:{length}', '--pairs', str(args.pairs),
                   '--lora-r', str(args.lora_r), '--model', args.model, '--stats-impl', args.stats_impl,
                   '--steps', str(args.steps), '--warmup', str(args.warmup), '--threads', str(args.threads)]
            if args.prompt_length:
                cmd += ['--prompt-length', str(args.prompt_length)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
                       HF_HUB_OFFLINE='1', WANDB_MODE='disabled')
            results.append(run_worker(cmd, env, f'{variant:5s} length={length}', dict(variant=variant, length=length)))
    add_ratios(results)
    print_table(args, results)
    write_results(args, results)


def add_ratios(results):
    full = {r['length']: r for r in results if r['variant'] == 'full' and 'error' not in r}
    for r in results:
        base = full.get(r['length'])
        if base and 'error' not in r:
            r.update(peak_vs_full=r['peak_bytes'] / base['peak_bytes'], time_vs_full=r['step_s'] / base['step_s'],
                     cpu_vs_full=r['cpu_s'] / base['cpu_s'])


def print_table(args, results):
    print(f'\nTDPO step ({args.model}, {args.pairs} pairs = {2 * args.pairs} sequences, stats_impl={args.stats_impl}, '
          f'AdamW, fp32, {args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up; lora.r={args.lora_r})')
    head = (f'{"length":>6} {"variant":7} {"trainable":>12} {"step s":>8} {"cpu s":>8} {"peak GiB":>9} '
            f'{"peak x full":>11} {"wall x full":>11} {"cpu x full":>10}')
    print(head + '\n' + '-' * len(head))
    for r in results:
        if 'error' in r:
            print(f'{r["length"]:>6} {r["variant"]:7} failed')
            continue
        print(f'{r["length"]:>6} {r["variant"]:7} {r["trainable_params"]:>12,} {r["step_s"]:8.2f} {r["cpu_s"]:8.2f} '
              f'{r["peak_bytes"] / 2**30:9.2f} {r["peak_vs_full"]:11.3f} {r["time_vs_full"]:11.3f} {r["cpu_vs_full"]:10.3f}')


if __name__ == '__main__':
    main()
