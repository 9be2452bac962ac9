"""Why this folder exists: to measure whether TDPO's per-sequence statistics can be computed without
materialising several (batch, length, vocab) float32 tensors, and at what cost in step time. This
script measures one full TDPO training step (policy forward+backward, reference forward, TDPO2 loss,
AdamW step) of a SmolLM2-135M-shaped Llama (random init) for each way of computing the statistics:

  lower_bound  policy forward+backward + reference forward, trivial loss (mean of the policy logits)
  naive        losses.tdpo_get_batch_logps (the reference-compatible computation) + tdpo_loss
  chunked      token_stats.chunked_sequence_stats on full logits + tdpo_loss
  fused        token_stats.fused_sequence_stats on final hidden states + lm_head weight + tdpo_loss

Each (vocab, variant) runs in a fresh subprocess so that peak memory is per variant. Peak memory is
the process's peak RSS on CPU (VmHWM, reset after the warm-up steps, so one-time compilation is
excluded; the whole-run ru_maxrss is reported too) and torch.cuda.max_memory_allocated on CUDA.

  python bench/bench_tdpo_step.py --batch 4 --length 512 --vocab 49152 --vocab 151936 --steps 3 \
      --out bench/results-cpu.json
  bash bench/gpu_check.sh      # CUDA, bf16, a Llama-3.2-1B-shaped model (--shape llama-1b), adds model FLOPs utilisation

With --layouts it compares pair layouts instead (`layout_worker`): the full TDPO2 update of
BasicTrainer (trainer.update: policy forward+backward, reference forward, fused statistics, AdamW) of
SmolLM2-135M-Instruct on real batches of the shared HH sample (its SmolLM2-tokenized lengths), the same
batches in the same order for each layout, one fresh process per layout:

  python bench/bench_tdpo_step.py --layouts padded,shared,packed --batch 8 --accumulation 2 --length 512 \
      --prompt-length 256 --steps 3 --warmup 1 --out bench/results-layouts-cpu.json
"""
import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ('lower_bound', 'naive', 'chunked', 'fused')
# dense bf16 tensor-core peaks (vendor data sheets), matched in this order against the CUDA device name
PEAK_BF16_TFLOPS = {'H100 PCIe': 756.0, 'H100 NVL': 835.0, 'H100': 989.0, 'H200': 989.0, 'GH200': 989.0,
                    'A100': 312.0, 'L40S': 362.0}
# model shapes (Llama architecture, tied embeddings): SmolLM2-135M's, and Llama-3.2-1B's (1.07B parameters
# at vocabulary 49,152, 1.28B at 151,936)
SHAPES = {'smollm2-135m': dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, head_dim=64),
          'llama-1b': dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, head_dim=64)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--batch', type=int, default=4, help='sequences per step (chosen + rejected), even')
    p.add_argument('--length', type=int, default=512)
    p.add_argument('--prompt-length', type=int, default=None, help='prompt tokens (labels -100); default length//4')
    p.add_argument('--vocab', type=int, action='append', help='repeatable; default 49152')
    p.add_argument('--variants', default=','.join(VARIANTS))
    p.add_argument('--steps', type=int, default=3, help='timed steps (median reported)')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps first (torch.compile happens here)')
    p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default=None, choices=['fp32', 'bf16'], help='default fp32 on CPU, bf16 on CUDA')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--shape', default='smollm2-135m', choices=sorted(SHAPES), help='model shape (random init)')
    p.add_argument('--layers', type=int, default=None, help="num_hidden_layers; default the shape's")
    p.add_argument('--peak-tflops', type=float, default=None, help='for MFU; default from the GPU name')
    p.add_argument('--out', default=None, help='JSON file for all results')
    p.add_argument('--layouts', default=None, help='compare pair layouts (e.g. padded,shared,packed) instead of variants')
    p.add_argument('--accumulation', type=int, default=1, help='--layouts: gradient_accumulation_steps per update')
    p.add_argument('--data', default=os.path.join(ROOT, '..', 'shared', 'data', 'hh-rlhf-harmless-sample', 'rows.jsonl.gz'),
                   help='--layouts: preference data to draw batches from')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_config(vocab, shape='smollm2-135m', layers=None):
    from transformers import LlamaConfig
    dims = dict(SHAPES[shape], **({'num_hidden_layers': layers} if layers else {}))
    return LlamaConfig(**dims, vocab_size=vocab, tie_word_embeddings=True, rms_norm_eps=1e-5,
                       rope_theta=100000, max_position_embeddings=8192)


def model_flops_per_step(policy, batch, length):
    """Model FLOPs of one step (no recomputation counted): 3 forwards' worth for the policy (forward and
    backward), 1 for the reference. A forward costs, per token, 2·P for P the weights of the linear layers
    (attention and MLP projections and lm_head, tied or not; not the input embedding's lookup), plus causal
    attention: QKᵀ and AV, each 2·T·(heads·head_dim) per layer for full attention, halved for causal."""
    import torch
    cfg = policy.config
    params = sum(m.weight.numel() for m in policy.modules() if isinstance(m, torch.nn.Linear))
    head_dim = getattr(cfg, 'head_dim', None) or cfg.hidden_size // cfg.num_attention_heads
    attention_fwd = 2 * cfg.num_hidden_layers * length * cfg.num_attention_heads * head_dim
    fwd_per_token = 2 * params + attention_fwd
    return (3 + 1) * fwd_per_token * batch * length


def peak_tflops(device_name):
    """The dense bf16 peak of a CUDA device by name, None if unknown (then pass --peak-tflops for MFU)."""
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


def make_batch(args, vocab, device):
    import torch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :args.prompt_length] = -100
    for i in range(args.batch):  # ragged responses: sequence i ends i·length/(4·batch) tokens early
        pad = i * args.length // (4 * args.batch)
        if pad:
            mask[i, -pad:], labels[i, -pad:], ids[i, -pad:] = 0, -100, 0
    return ids.to(device), mask.to(device), labels.to(device)


def worker(args, variant, vocab):
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    import token_stats
    from losses import tdpo_get_batch_logps, tdpo_loss
    from transformers import LlamaForCausalLM

    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    dtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    torch.manual_seed(0)
    with device:  # initialise on the device: a 1B model's random init on the CPU takes long
        policy = LlamaForCausalLM(model_config(vocab, args.shape, args.layers)).to(dtype=dtype)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    ids, mask, labels = make_batch(args, vocab, device)
    half = args.batch // 2

    def loss_of_stats(stats):
        margin, kl, _ = stats
        losses, _, _ = tdpo_loss(margin[:half], margin[half:], kl[:half], kl[half:], beta=0.1, alpha=0.5, if_tdpo2=True)
        return losses.mean()

    def forward():  # returns only the loss, so that every other tensor dies with this frame
        if variant == 'fused':
            hidden = token_stats.final_hidden_states(policy, ids, mask)
            with torch.no_grad():
                ref_hidden = token_stats.final_hidden_states(reference, ids, mask)
            return loss_of_stats(token_stats.fused_sequence_stats(
                hidden, token_stats.output_head(policy), ref_hidden, token_stats.output_head(reference), labels))
        logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits
        with torch.no_grad():
            ref_logits = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
        if variant == 'lower_bound':
            return logits.float().mean()
        stats_fn = tdpo_get_batch_logps if variant == 'naive' else token_stats.chunked_sequence_stats
        return loss_of_stats(stats_fn(logits, ref_logits, labels))

    def step():
        loss = forward()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    reset_peak_memory(cuda)
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    peak = peak_memory(cuda)
    result = dict(variant=variant, vocab=vocab, step_s=statistics.median(times), times_s=times,
                  cpu_s=statistics.median(cpu_times), peak_bytes=peak,  # cpu_s: steadier than wall on a shared machine
                  ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, losses=losses,
                  compiled=token_stats.COMPILE, device=torch.cuda.get_device_name() if cuda else 'cpu',
                  flops_per_step=model_flops_per_step(policy, args.batch, args.length),
                  loadavg_1min_after=os.getloadavg()[0])
    tflops = args.peak_tflops or (peak_tflops(result['device']) if cuda else None)
    if tflops:  # model FLOPs utilisation (on a CPU only with --peak-tflops: the dry run of gpu_check.sh)
        result['mfu'] = result['flops_per_step'] / result['step_s'] / (tflops * 1e12)
    print('RESULT ' + json.dumps(result), flush=True)


def reset_peak_memory(cuda: bool):
    import torch
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM (peak RSS) to the current RSS


def peak_memory(cuda: bool) -> int:
    """Bytes: peak RSS since the last reset on CPU, peak allocated on CUDA."""
    import torch
    if cuda:
        return torch.cuda.max_memory_allocated()
    status = open('/proc/self/status').read()
    return int(status.split('VmHWM:')[1].split()[0]) * 1024


def main():
    args = parse_args()
    args.vocab = args.vocab or [49152]
    args.prompt_length = args.length // 4 if args.prompt_length is None else args.prompt_length
    args.dtype = args.dtype or ('bf16' if args.device.startswith('cuda') else 'fp32')
    if args.worker and args.layouts:
        return layout_worker(args, args.worker)
    if args.worker:
        variant, vocab = args.worker.split(':')
        return worker(args, variant, int(vocab))
    if args.layouts:
        return run_layouts(args)
    results = []
    for vocab in args.vocab:
        for variant in args.variants.split(','):
            cmd = [sys.executable, os.path.abspath(__file__), '--worker', f'{variant}:{vocab}',
                   '--batch', str(args.batch), '--length', str(args.length), '--prompt-length', str(args.prompt_length),
                   '--steps', str(args.steps), '--warmup', str(args.warmup), '--device', args.device,
                   '--dtype', args.dtype, '--threads', str(args.threads), '--shape', args.shape]
            if args.layers:
                cmd += ['--layers', str(args.layers)]
            if args.peak_tflops:
                cmd += ['--peak-tflops', str(args.peak_tflops)]
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
            results.append(run_worker(cmd, env, f'{variant:12s} vocab={vocab}', dict(variant=variant, vocab=vocab)))
    add_ratios(results)
    print_table(args, results)
    write_results(args, results)


def run_worker(cmd, env, label, keys):
    """One variant in its own process: the dict its RESULT line holds, or `keys` with the error."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
    if proc.returncode or not lines:
        print(f'{label} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}', flush=True)
        return dict(keys, error=proc.stderr[-3000:])
    r = json.loads(lines[-1][len('RESULT '):])
    print(f'  done {label}: {r["step_s"]:.2f} s, peak {r["peak_bytes"] / 2**30:.2f} GiB', flush=True)
    return r


def write_results(args, results):
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k != 'worker'}, results=results), f, indent=1)
        print(f'wrote {args.out}')


def add_ratios(results):
    by = {(r['vocab'], r['variant']): r for r in results if 'error' not in r}
    for r in results:
        naive, low = by.get((r['vocab'], 'naive')), by.get((r['vocab'], 'lower_bound'))
        if 'error' in r:
            continue
        if naive:
            r['time_vs_naive'] = r['step_s'] / naive['step_s']
            if 'cpu_s' in r and 'cpu_s' in naive:
                r['cpu_vs_naive'] = r['cpu_s'] / naive['cpu_s']
        if low:
            r['time_vs_lower_bound'] = r['step_s'] / low['step_s']
            if 'cpu_s' in r and 'cpu_s' in low:
                r['cpu_vs_lower_bound'] = r['cpu_s'] / low['cpu_s']
            r['mem_above_lower_bound_bytes'] = r['peak_bytes'] - low['peak_bytes']
        if naive and low and naive['peak_bytes'] > low['peak_bytes']:
            r['mem_above_lb_vs_naive'] = r['mem_above_lower_bound_bytes'] / (naive['peak_bytes'] - low['peak_bytes'])


def print_table(args, results):
    print(f'\nTDPO step, batch {args.batch} x length {args.length} (prompt {args.prompt_length}), {args.device} '
          f'{args.dtype}, {args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up')
    head = f'{"vocab":>7} {"variant":12} {"step s":>8} {"x naive":>8} {"x lower":>8} {"peak GiB":>9} ' \
           f'{"+lower GiB":>10} {"+lower/naive+":>13} {"MFU":>6} {"cpu x naive":>11} {"cpu x lower":>11}'
    print(head + '\n' + '-' * len(head))
    fmt = lambda r, k, f: (f.format(r[k]) if k in r else '-')
    for r in results:
        if 'error' in r:
            print(f'{r["vocab"]:>7} {r["variant"]:12} failed')
            continue
        print(f'{r["vocab"]:>7} {r["variant"]:12} {r["step_s"]:8.2f} {fmt(r, "time_vs_naive", "{:.3f}"):>8} '
              f'{fmt(r, "time_vs_lower_bound", "{:.3f}"):>8} {r["peak_bytes"] / 2**30:9.2f} '
              f'{r.get("mem_above_lower_bound_bytes", 0) / 2**30:10.2f} {fmt(r, "mem_above_lb_vs_naive", "{:.3f}"):>13} '
              f'{fmt(r, "mfu", "{:.1%}"):>6} {fmt(r, "cpu_vs_naive", "{:.3f}"):>11} '
              f'{fmt(r, "cpu_vs_lower_bound", "{:.3f}"):>11}')



# ---- pair layouts -----------------------------------------------------------------------------

def layout_worker(args, layout):
    """Time BasicTrainer.update on real batches with pair_layout=`layout`; print one RESULT line."""
    import tempfile

    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    import pair_layout
    import run_config
    import train
    import trainers
    import utils
    cuda = args.device.startswith('cuda')
    run_dir = tempfile.mkdtemp(prefix='bench-layout-')
    config = run_config.compose_config([
        'model=smollm2-135m', 'loss=tdpo', 'exp_name=bench', f'datasets=[{os.path.abspath(args.data)}]',
        f'local_dirs=[{os.path.join(ROOT, ".cache")}]', f'local_run_dir={run_dir}', f'batch_size={args.batch}',
        f'max_length={args.length}', f'max_prompt_length={args.prompt_length}', f'pair_layout={layout}',
        'stats_impl=fused', 'optimizer=AdamW', 'lr=1e-4', 'warmup_steps=0', 'n_eval_examples=0', 'wandb.enabled=false',
        f'n_examples={args.batch * (args.warmup + args.steps)}', 'minimum_log_interval_secs=0',
        f'gradient_accumulation_steps={args.accumulation}',
        f'model.policy_dtype={"bfloat16" if args.dtype == "bf16" else "float32"}',
        f'model.reference_dtype={"bfloat16" if args.dtype == "bf16" else "float32"}'])
    train.check_config(config)
    policy, reference = train.build_models(config)
    trainer = trainers.BasicTrainer(policy, config, config.seed, run_dir, reference_model=reference)
    assert trainer.pair_layout == layout, f'{layout} fell back to {trainer.pair_layout}'
    batches = list(trainer.train_batches())
    times, cpu_times, losses, grad_norms, positions, tokens = [], [], [], [], [], []
    for i, batch in enumerate(batches):
        if i == args.warmup:
            reset_peak_memory(cuda)
        microbatches = [pair_layout.arrange(utils.slice_batch(batch, i, args.accumulation), layout, args.length)
                        for i in range(args.accumulation)]
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.policy.train()
        trainer.update(batch)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
            positions.append(sum(rows.input_ids.numel() for rows in microbatches))
            tokens.append(sum(int((rows.source >= 0).sum()) for rows in microbatches))  # of the padded sequences
        losses.append(trainer.pending_metrics['loss/train'][-args.batch:])
        grad_norms.append(trainer.pending_metrics['grad_norm'][-1])
    result = dict(layout=layout, step_s=statistics.median(times), times_s=times, cpu_s=statistics.median(cpu_times),
                  cpu_times_s=cpu_times, peak_bytes=peak_memory(cuda), positions_per_step=statistics.mean(positions),
                  sequence_tokens_per_step=statistics.mean(tokens), losses=losses, grad_norms=grad_norms,
                  device=torch.cuda.get_device_name() if cuda else 'cpu', loadavg_1min_after=os.getloadavg()[0])
    print('RESULT ' + json.dumps(result), flush=True)


def run_layouts(args):
    results = []
    for layout in args.layouts.split(','):
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', layout, '--layouts', args.layouts,
               '--data', args.data, '--batch', str(args.batch), '--length', str(args.length),
               '--prompt-length', str(args.prompt_length), '--steps', str(args.steps), '--warmup', str(args.warmup),
               '--device', args.device, '--dtype', args.dtype, '--threads', str(args.threads),
               '--accumulation', str(args.accumulation)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE='1')
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith('RESULT ')]
        if proc.returncode or not lines:
            print(f'{layout} failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}', flush=True)
            results.append(dict(layout=layout, error=proc.stderr[-3000:]))
            continue
        results.append(json.loads(lines[-1][len('RESULT '):]))
        print(f'  done {layout:8s}: {results[-1]["step_s"]:.2f} s/step, cpu {results[-1]["cpu_s"]:.2f} s', flush=True)
    print_layout_table(args, results)
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k != 'worker'}, results=results), f, indent=1)
        print(f'wrote {args.out}')


def print_layout_table(args, results):
    """Examples/s and CPU time per example against padded's; losses and gradient norms against padded's."""
    base = next((r for r in results if r['layout'] == 'padded' and 'error' not in r), None)
    print(f'\nTDPO2 update (BasicTrainer, fused statistics, AdamW), SmolLM2-135M, batch {args.batch} pairs '
          f'({args.accumulation} accumulation steps), max_length {args.length}, max_prompt_length {args.prompt_length}, {args.device} {args.dtype}, '
          f'{args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up')
    head = (f'{"layout":8} {"positions":>9} {"ex/s":>7} {"x padded":>8} {"cpu s/ex":>8} {"x padded":>8} '
            f'{"peak GiB":>8} {"max |dloss|":>11} {"max |dgrad norm|/norm":>21}')
    print(head + '\n' + '-' * len(head))
    for r in results:
        if 'error' in r:
            print(f'{r["layout"]:8} failed')
            continue
        speed, cpu = args.batch / r['step_s'], r['cpu_s'] / args.batch
        line = f'{r["layout"]:8} {r["positions_per_step"]:9.0f} {speed:7.3f} '
        if base:
            loss_diff = max(abs(a - b) for x, y in zip(r['losses'], base['losses']) for a, b in zip(x, y))
            norm_diff = max(abs(a - b) / b for a, b in zip(r['grad_norms'], base['grad_norms']))
            r.update(examples_per_s_vs_padded=base['step_s'] / r['step_s'], cpu_vs_padded=r['cpu_s'] / base['cpu_s'],
                     max_loss_diff=loss_diff, max_grad_norm_rel_diff=norm_diff)
            line += (f'{r["examples_per_s_vs_padded"]:8.2f} {cpu:8.2f} {r["cpu_vs_padded"]:8.2f} '
                     f'{r["peak_bytes"] / 2**30:8.2f} {loss_diff:11.2e} {norm_diff:21.2e}')
        print(line)


if __name__ == '__main__':
    main()
