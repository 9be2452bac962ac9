"""Why this script exists: at long context a TDPO step's memory is its activations, so LoRA alone saves
little there; activation checkpointing (`activation_checkpointing=true`, memory.py) is what bounds them. It
measures the real trainer's update (`BasicTrainer.update`: policy forward and backward, reference forward,
fused TDPO2 statistics, AdamW) of SmolLM2-135M-Instruct, 8 pairs per update, `pair_layout=packed`, for

  full        full fine-tuning (policy, frozen reference copy, gradients and AdamW state for every weight)
  full+ckpt   the same with activation_checkpointing=true
  lora        lora.r=16 (one copy of the weights, the reference is the policy with adapters off)
  lora+ckpt   lora.r=16 with activation_checkpointing=true

on two kinds of data:
  hh-L      real pairs of the shared HH sample, max_length L (1,024), max_prompt_length L/2: their own lengths
  fixed-L   pairs built from HH text so that every chosen and rejected sequence is exactly L tokens (1,024 and
            2,048): the prompt is consecutive HH dialogues joined, ending at an Assistant turn, the chosen and
            rejected responses are the chosen and rejected final replies of the following rows joined, each
            longer than L/2 tokens; train.py's truncation (max_prompt_length L/2, max_length L) keeps the
            prompt's last L/2 tokens and each response's first L/2 (EOS included)

Each (data, variant) runs in a fresh process: its whole-process peak RSS (VmHWM: model loading, warm-up and
measured updates; on CUDA torch.cuda.max_memory_allocated) and the wall and CPU time of each measured update.
A process whose RSS passes --memory-limit-gib is killed (on CUDA: one that runs out of memory) and recorded as
not fitting at that gradient_accumulation_steps; the configuration is then run again with twice the accumulation (same 8 pairs
per update), up to one pair per microbatch. Ratios are against `full` on the same data, in the same run.

  python bench/bench_memory.py --out bench/results-memory-cpu.json                   # the full table (CPU)
  python bench/bench_memory.py --model model=tiny --hh-length 128 --fixed-length 128 --steps 1 --warmup 1  # smoke
"""
import argparse
import gzip
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
HH = os.path.join(ROOT, '..', 'shared', 'data', 'hh-rlhf-harmless-sample', 'rows.jsonl.gz')
VARIANTS = {'full': (False, None), 'full+ckpt': (True, None), 'lora': (False, 16), 'lora+ckpt': (True, 16)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--pairs', type=int, default=8, help='preference pairs per update (batch_size)')
    p.add_argument('--hh-length', type=int, action='append', help='max_length of the real-pairs runs; default 1024; 0: none')
    p.add_argument('--fixed-length', type=int, action='append', help='tokens per sequence of the built pairs; '
                                                                     'default 1024 and 2048; 0: none')
    p.add_argument('--variants', default=','.join(VARIANTS))
    p.add_argument('--model', default='model=smollm2-135m', help="train.py's model overrides (space-separated)")
    p.add_argument('--steps', type=int, default=2, help='measured updates (median reported)')
    p.add_argument('--warmup', type=int, default=1, help='updates first (AdamW state, torch.compile)')
    p.add_argument('--dtype', default=None, choices=['fp32', 'bf16'], help='default fp32 on CPU, bf16 on CUDA')
    p.add_argument('--memory-limit-gib', type=float, default=18.0,
                   help='CPU: kill a run whose RSS passes this and record it as not fitting')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--data', default=HH, help='HH-format rows (the real pairs, and the text of the built ones)')
    p.add_argument('--out', default=None, help='JSON file for all results')
    p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def compose(args, overrides):
    """The config of train.py with the --model overrides, then `overrides`."""
    import run_config
    return run_config.compose_config([*args.model.split(), *overrides])


def hh_dialogues(path):
    """(prompt ending with '\\n\\nAssistant:', chosen final reply, rejected final reply) of each HH row."""
    marker = '\n\nAssistant:'
    with gzip.open(path, 'rt') if path.endswith('.gz') else open(path) as f:
        for line in f:
            row = json.loads(line)
            cut_c, cut_r = row['chosen'].rfind(marker) + len(marker), row['rejected'].rfind(marker) + len(marker)
            if row['chosen'][:cut_c] == row['rejected'][:cut_r] and '\n\nHuman:' not in row['chosen'][cut_c:]:
                yield row['chosen'][:cut_c], row['chosen'][cut_c:].strip(), row['rejected'][cut_r:].strip()


def build_fixed_pairs(args, length, path):
    """Write `pairs` x (warmup + steps) HH-format rows whose prompt and both responses each exceed length/2
    tokens (see the module docstring); returns the file."""
    import model_loading
    import utils
    config = compose(args, ['exp_name=x', f'local_dirs=[{os.path.join(ROOT, ".cache")}]'])
    tokenizer = model_loading.load_tokenizer(config.model, utils.get_local_dir(config.local_dirs))
    count = lambda text: len(tokenizer(text, add_special_tokens=False)['input_ids'])
    rows = list(hh_dialogues(args.data))
    half, i, out = length // 2, 0, []
    while len(out) < args.pairs * (args.warmup + args.steps):
        prompt = ''
        while count(prompt) <= half:
            prompt, i = prompt + rows[i % len(rows)][0], i + 1
        chosen = rejected = ''
        while count(chosen) <= half or count(rejected) <= half:
            _, c, r = rows[i % len(rows)]
            chosen, rejected, i = f'{chosen} {c}', f'{rejected} {r}', i + 1
        out.append({'chosen': prompt + chosen, 'rejected': prompt + rejected})
    with open(path, 'w') as f:
        f.writelines(json.dumps(row) + '\n' for row in out)
    return path


def worker(args, case):
    """One (data, variant, accumulation): build the trainer train.py would, run its updates, print RESULT."""
    import torch
    torch.set_num_threads(args.threads)
    import memory
    import train
    import trainers
    cuda = torch.cuda.is_available()
    dtype = 'bfloat16' if (args.dtype or ('bf16' if cuda else 'fp32')) == 'bf16' else 'float32'
    checkpointing, lora_r = VARIANTS[case['variant']]
    run_dir = tempfile.mkdtemp(prefix='bench-memory-')
    config = compose(args, [
        'loss=tdpo', 'exp_name=bench_memory', f'datasets=[{case["file"]}]', f'local_dirs=[{os.path.join(ROOT, ".cache")}]',
        f'local_run_dir={run_dir}', f'batch_size={args.pairs}', f'gradient_accumulation_steps={case["accumulation"]}',
        f'max_length={case["length"]}', f'max_prompt_length={case["length"] // 2}', 'pair_layout=packed',
        'stats_impl=fused', 'optimizer=AdamW', 'lr=1e-5', 'warmup_steps=0', 'n_eval_examples=0', 'eval_fraction=0',
        'wandb.enabled=false', f'n_examples={args.pairs * (args.warmup + args.steps)}', 'minimum_log_interval_secs=0',
        f'activation_checkpointing={checkpointing}', f'lora.r={lora_r or "null"}',
        f'model.policy_dtype={dtype}', f'model.reference_dtype={dtype}'])
    train.check_config(config)
    with torch.device('cuda' if cuda else 'cpu'):  # a random init on the GPU: seconds for a 1B model, not minutes
        policy, reference = train.build_models(config)
    trainer = trainers.BasicTrainer(policy, config, config.seed, run_dir, reference_model=reference)
    try:
        result = measure(args, case, trainer, cuda)
    except Exception as error:  # CUDA (or the CPU allocator) out of memory: this accumulation does not fit
        if not memory.is_out_of_memory(error):
            raise
        result = dict(case, did_not_fit=True, error_line=str(error).splitlines()[0][:200])
    print('RESULT ' + json.dumps(dict(result, dtype=dtype)), flush=True)


def measure(args, case, trainer, cuda):
    """Run the trainer's updates; times of the measured ones, the whole-process peak, the tokens."""
    import torch
    import pair_layout
    import utils
    times, cpu_times, positions, lengths, peaks, held = [], [], [], [], [], []
    loaded = None if cuda else proc_status_bytes('VmHWM')  # models, data and libraries, before any update
    for i, batch in enumerate(trainer.train_batches()):
        lengths += batch['chosen_attention_mask'].sum(1).tolist() + batch['rejected_attention_mask'].sum(1).tolist()
        positions.append(sum(pair_layout.arrange(utils.slice_batch(batch, j, case['accumulation']), 'packed',
                                                 case['length']).input_ids.numel() for j in range(case['accumulation'])))
        start, cpu_start = time.perf_counter(), time.process_time()
        trainer.policy.train()
        trainer.update(batch)
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        if not cuda:  # how the peak and the memory held grow over updates (the allocator keeps freed blocks)
            peaks.append(proc_status_bytes('VmHWM'))
            held.append(proc_status_bytes('VmRSS'))
    peak = torch.cuda.max_memory_allocated() if cuda else proc_status_bytes('VmHWM')
    return dict(case, step_s=statistics.median(times), times_s=times, cpu_s=statistics.median(cpu_times),
                peak_bytes=peak, peak_before_updates_bytes=loaded, peak_after_update_bytes=peaks,
                rss_after_update_bytes=held, positions_per_update=statistics.mean(positions),
                mean_sequence_tokens=statistics.mean(lengths),
                max_sequence_tokens=max(lengths), losses=trainer.pending_metrics['loss/train'],
                device=torch.cuda.get_device_name() if cuda else 'cpu', loadavg_1min_after=os.getloadavg()[0])


def proc_status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (VmHWM: the peak RSS so far; VmRSS: now)."""
    return int(open('/proc/self/status').read().split(field + ':')[1].split()[0]) * 1024


def run_case(args, case):
    """Run one case in its own process, killing it if its RSS passes the limit (CPU); the RESULT dict, or the
    case with `did_not_fit` (and the RSS it reached) or `error`."""
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', json.dumps(case), '--model', args.model,
           '--pairs', str(args.pairs), '--steps', str(args.steps), '--warmup', str(args.warmup),
           '--threads', str(args.threads), '--data', args.data, *(['--dtype', args.dtype] if args.dtype else [])]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE='1',
               WANDB_MODE='disabled', TOKENIZERS_PARALLELISM='false')
    limit, rss, start = args.memory_limit_gib * 2**30, 0, time.time()
    with tempfile.TemporaryFile('w+') as out, tempfile.TemporaryFile('w+') as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=ROOT, start_new_session=True)
        while proc.poll() is None:
            try:
                with open(f'/proc/{proc.pid}/status') as f:
                    rss = max(rss, int(f.read().split('VmRSS:')[1].split()[0]) * 1024)
            except (OSError, IndexError):
                pass
            if rss > limit:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return dict(case, did_not_fit=True, rss_when_stopped_bytes=rss, seconds=time.time() - start)
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith('RESULT ')]
        if proc.returncode or not lines:
            return dict(case, error=err.read()[-3000:], returncode=proc.returncode)
        return dict(json.loads(lines[-1][len('RESULT '):]), seconds=time.time() - start)


def run_all(args, data_dir):
    """Every (data, variant): at accumulation 1, then doubled while it does not fit, up to one pair per microbatch."""
    datasets = [(f'hh-{n}', n, args.data) for n in args.hh_length if n] + \
        [(f'fixed-{n}', n, build_fixed_pairs(args, n, os.path.join(data_dir, f'fixed-{n}.jsonl'))) for n in args.fixed_length if n]
    results = []
    for name, length, path in datasets:
        for variant in args.variants.split(','):
            accumulation = 1
            while True:
                r = run_case(args, dict(data=name, length=length, file=path, variant=variant, accumulation=accumulation))
                results.append(r)
                write(args, results, complete=False)  # what a time limit (gpu_check.sh) leaves is still read
                status = ('did not fit' if r.get('did_not_fit') else 'failed' if 'error' in r else
                          f'{r["step_s"]:.1f} s/update, peak {r["peak_bytes"] / 2**30:.2f} GiB')
                print(f'  {name:10s} {variant:10s} accumulation {accumulation}: {status} ({r.get("seconds", 0):.0f} s)',
                      flush=True)
                if not r.get('did_not_fit') or accumulation * 2 > args.pairs:
                    break
                accumulation *= 2
    return results


def add_ratios(results):
    full = {r['data']: r for r in results if r['variant'] == 'full' and 'peak_bytes' in r}
    for r in results:
        base = full.get(r['data'])
        if base and 'peak_bytes' in r:
            r.update(peak_vs_full=r['peak_bytes'] / base['peak_bytes'], time_vs_full=r['step_s'] / base['step_s'],
                     cpu_vs_full=r['cpu_s'] / base['cpu_s'])


def table(args, results):
    lines = ['| data | tokens per sequence (mean, max) | variant | accumulation | peak GiB | peak x full | '
             's per update | x full | CPU s per update | x full |', '|---|---:|---|---:|---:|---:|---:|---:|---:|---:|']
    for r in results:
        head = f'| {r["data"]} | ' + (f'{r["mean_sequence_tokens"]:.0f}, {r["max_sequence_tokens"]}' if 'peak_bytes' in r
                                      else '') + f' | {r["variant"]} | {r["accumulation"]} | '
        if r.get('did_not_fit'):
            why = 'out of memory' if 'error_line' in r else f'RSS passed {args.memory_limit_gib:g} GiB'
            lines.append(head + f'does not fit ({why}) | | | | | |')
        elif 'error' in r:
            lines.append(head + f'failed (exit {r.get("returncode")}) | | | | | |')
        else:
            ratio = lambda key: f'{r[key]:.2f}' if key in r else '-'
            lines.append(head + f'{r["peak_bytes"] / 2**30:.2f} | {ratio("peak_vs_full")} | {r["step_s"]:.1f} | '
                         f'{ratio("time_vs_full")} | {r["cpu_s"]:.1f} | {ratio("cpu_vs_full")} |')
    return '\n'.join(lines)


def main():
    args = parse_args()
    args.hh_length = args.hh_length or [1024]
    args.fixed_length = args.fixed_length or [1024, 2048]
    if args.worker:
        return worker(args, json.loads(args.worker))
    start = time.time()
    with tempfile.TemporaryDirectory(prefix='bench-memory-data-') as data_dir:
        results = run_all(args, data_dir)
    add_ratios(results)
    print(f'\nTDPO2 update (BasicTrainer, packed, fused statistics, AdamW), {args.model}, {args.pairs} pairs per update, '
          f'median of {args.steps} updates after {args.warmup} warm-up, {args.threads} threads; whole-process peak; '
          f'{time.time() - start:.0f} s in all\n')
    print(table(args, results))
    write(args, results, complete=True)
    if args.out:
        print(f'wrote {args.out}')


def write(args, results, complete: bool):
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args={k: v for k, v in vars(args).items() if k != 'worker'}, results=results,
                           complete=complete), f, indent=1)


if __name__ == '__main__':
    main()
