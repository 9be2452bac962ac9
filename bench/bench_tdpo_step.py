"""Why this folder exists: issue 4 asks whether TDPO's per-sequence statistics can be computed without
materialising several (batch, length, vocab) float32 tensors, and at what cost in step time. This
script measures one full TDPO training step (policy forward+backward, reference forward, TDPO2 loss,
AdamW step) of a SmolLM2-135M-shaped Llama (random init) for each way of computing the statistics:

  lower_bound  policy forward+backward + reference forward, trivial loss (mean of the policy logits)
  naive        trainers._tdpo_get_batch_logps (the reference-compatible computation) + tdpo_loss
  chunked      token_stats.chunked_sequence_stats on full logits + tdpo_loss
  fused        token_stats.fused_sequence_stats on final hidden states + lm_head weight + tdpo_loss

Each (vocab, variant) runs in a fresh subprocess so that peak memory is per variant. Peak memory is
the process's peak RSS on CPU (VmHWM, reset after the warm-up steps, so one-time compilation is
excluded; the whole-run ru_maxrss is reported too) and torch.cuda.max_memory_allocated on CUDA.

  python bench/bench_tdpo_step.py --batch 4 --length 512 --vocab 49152 --vocab 151936 --steps 3 \
      --out bench/results-cpu.json
  bash bench/gpu.sh            # CUDA, bf16, adds model FLOPs utilisation
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
PEAK_BF16_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L40S': 362.0, 'A10': 125.0}


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
    p.add_argument('--layers', type=int, default=30, help='num_hidden_layers (30 = SmolLM2-135M)')
    p.add_argument('--peak-tflops', type=float, default=None, help='for MFU; default from the GPU name')
    p.add_argument('--out', default=None, help='JSON file for all results')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def model_config(vocab, layers):
    from transformers import LlamaConfig
    return LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                       num_key_value_heads=3, vocab_size=vocab, tie_word_embeddings=True, rms_norm_eps=1e-5,
                       rope_theta=100000, max_position_embeddings=8192)


def model_flops_per_step(policy, batch, length):
    """Model FLOPs (no recomputation): 6·P·tokens for the policy, 2·P·tokens for the reference, P the
    matmul parameters (all but the input embedding; the tied lm_head counts), plus causal attention."""
    cfg = policy.config
    params = sum(p.numel() for p in policy.parameters())
    if not cfg.tie_word_embeddings:
        params -= policy.get_input_embeddings().weight.numel()
    attention_fwd = 2 * cfg.num_hidden_layers * length * cfg.hidden_size  # QKᵀ and AV, causal half
    fwd_per_token = 2 * params + attention_fwd
    return (3 + 1) * fwd_per_token * batch * length


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
    from trainers import _tdpo_get_batch_logps, tdpo_loss
    from transformers import LlamaForCausalLM

    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    dtype = torch.bfloat16 if args.dtype == 'bf16' else torch.float32
    torch.manual_seed(0)
    policy = LlamaForCausalLM(model_config(vocab, args.layers)).to(device=device, dtype=dtype)
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
        stats_fn = _tdpo_get_batch_logps if variant == 'naive' else token_stats.chunked_sequence_stats
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
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')  # reset VmHWM (peak RSS) to the current RSS
    times, cpu_times, losses = [], [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        status = open('/proc/self/status').read()
        peak = int(status.split('VmHWM:')[1].split()[0]) * 1024
    result = dict(variant=variant, vocab=vocab, step_s=statistics.median(times), times_s=times,
                  cpu_s=statistics.median(cpu_times), peak_bytes=peak,  # cpu_s: steadier than wall on a shared machine
                  ru_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, losses=losses,
                  compiled=token_stats.COMPILE, device=torch.cuda.get_device_name() if cuda else 'cpu',
                  flops_per_step=model_flops_per_step(policy, args.batch, args.length),
                  loadavg_1min_after=os.getloadavg()[0])
    if cuda:
        name = torch.cuda.get_device_name()
        tflops = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if tflops:
            result['mfu'] = result['flops_per_step'] / result['step_s'] / (tflops * 1e12)
    print('RESULT ' + json.dumps(result), flush=True)


def main():
    args = parse_args()
    args.vocab = args.vocab or [49152]
    args.prompt_length = args.length // 4 if args.prompt_length is None else args.prompt_length
    args.dtype = args.dtype or ('bf16' if args.device.startswith('cuda') else 'fp32')
    if args.worker:
        variant, vocab = args.worker.split(':')
        return worker(args, variant, int(vocab))
    results = []
    for vocab in args.vocab:
        for variant in args.variants.split(','):
            cmd = [sys.executable, os.path.abspath(__file__), '--worker', f'{variant}:{vocab}',
                   '--batch', str(args.batch), '--length', str(args.length), '--prompt-length', str(args.prompt_length),
                   '--steps', str(args.steps), '--warmup', str(args.warmup), '--device', args.device,
                   '--dtype', args.dtype, '--threads', str(args.threads), '--layers', str(args.layers)]
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


if __name__ == '__main__':
    main()
