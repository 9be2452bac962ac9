#!/usr/bin/env bash
# The offline controlled-sentiment demo (`make demo` calls this once .venv exists, with its python on PATH):
#   1. build VADER-labelled preference pairs from SmolLM2-135M-Instruct's own movie reviews (cached)
#   2. SFT on the preferred reviews            (train.py loss=sft)
#   3. TDPO2 from the SFT model                (train.py loss=tdpo, reference = the SFT model)
#   4. evaluate: reward of policy vs reference samples on held-out prompts, KL(policy || reference)
#   5. print the before/after table; summary in .cache/demo/summary.json
# Sized for a 2-core CPU machine without GPU or network (see demo/README.md for sizes and timings). Every size can be
# overridden from the environment, e.g. `N_PROMPTS=128 TDPO_EPOCHS=3 bash demo/run_demo.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
DATA_DIR=${DATA_DIR:-.cache/demo}
TRAIN=$DATA_DIR/sentiment_pairs.jsonl
TEST=$DATA_DIR/sentiment_pairs_test.jsonl
MODEL=${MODEL:-smollm2-135m}
N_PROMPTS=${N_PROMPTS:-64}              # train prompts (each gives at most one pair; near-ties are dropped)
N_TEST_PROMPTS=${N_TEST_PROMPTS:-16}    # held-out prompts (disjoint)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-40}    # review length when building the pairs and when evaluating
MIN_GAP=${MIN_GAP:-0.2}                 # minimum VADER difference between chosen and rejected
SFT_LR=${SFT_LR:-1e-5}
SFT_EPOCHS=${SFT_EPOCHS:-1}
SFT_BATCH_SIZE=${SFT_BATCH_SIZE:-8}
TDPO_LR=${TDPO_LR:-1e-4}
TDPO_EPOCHS=${TDPO_EPOCHS:-1}
TDPO_BATCH_SIZE=${TDPO_BATCH_SIZE:-4}
TDPO_BETA=${TDPO_BETA:-0.1}
TDPO_ALPHA=${TDPO_ALPHA:-0.5}
OPTIMIZER=${OPTIMIZER:-AdamW}
EVAL_SAMPLES_PER_PROMPT=${EVAL_SAMPLES_PER_PROMPT:-4}
SEED=${SEED:-0}

source demo/common.sh demo

mkdir -p "$DATA_DIR"
run_dir() { sed -n 's/^run directory: //p' "$1" | tail -n 1; }
start_all=$(now)

# Train-time settings shared by SFT and TDPO: short sequences (prompt ~40 tokens + review <= 41),
# evaluation only at the end of a run, no sampling during evaluation, no wandb.
COMMON=(model="$MODEL" datasets="[$TRAIN]" eval_datasets="[$TEST]" seed="$SEED" eval_batch_size=16 optimizer="$OPTIMIZER" warmup_steps=2 max_length=96 max_prompt_length=64
        eval_every=1000000 do_first_eval=false sample_during_eval=false wandb.enabled=false eval_fraction=0.05)

echo "=== [1/4] build preference pairs ($N_PROMPTS train + $N_TEST_PROMPTS held-out prompts, two reviews each)"
t=$(now)
"$PYTHON" -u demo/sentiment.py build --out "$TRAIN" --test-out "$TEST" --n-prompts "$N_PROMPTS" \
    --n-test-prompts "$N_TEST_PROMPTS" --max-new-tokens "$MAX_NEW_TOKENS" --min-gap "$MIN_GAP" --seed "$SEED" \
    --model "$MODEL" --eval-fraction 0.05
T[build]=$(elapsed "$t"); echo "--- build: ${T[build]} s"

echo "=== [2/4] SFT on the preferred reviews"
t=$(now)
"$PYTHON" -u train.py "${COMMON[@]}" loss=sft exp_name=demo_sft batch_size="$SFT_BATCH_SIZE" lr="$SFT_LR" n_epochs="$SFT_EPOCHS" \
    n_eval_examples=0 2>&1 | tee "$DATA_DIR/sft.log"
SFT_RUN=$(run_dir "$DATA_DIR/sft.log")
[ -n "$SFT_RUN" ] && [ -f "$SFT_RUN/LATEST/policy.pt" ] || { echo "demo: no SFT checkpoint (see $DATA_DIR/sft.log)"; exit 1; }
T[sft]=$(elapsed "$t"); echo "--- sft: ${T[sft]} s ($SFT_RUN)"

echo "=== [3/4] TDPO2 from the SFT model (reference = SFT model)"
t=$(now)
"$PYTHON" -u train.py "${COMMON[@]}" loss=tdpo loss.if_tdpo2=true loss.beta="$TDPO_BETA" loss.alpha="$TDPO_ALPHA" \
    exp_name=demo_tdpo2 batch_size="$TDPO_BATCH_SIZE" lr="$TDPO_LR" n_epochs="$TDPO_EPOCHS" n_eval_examples=64 \
    model.archive="$SFT_RUN/LATEST/policy.pt" 2>&1 | tee "$DATA_DIR/tdpo.log"
TDPO_RUN=$(run_dir "$DATA_DIR/tdpo.log")
[ -n "$TDPO_RUN" ] && [ -f "$TDPO_RUN/hf/config.json" ] || { echo "demo: no TDPO export (see $DATA_DIR/tdpo.log)"; exit 1; }
T[tdpo]=$(elapsed "$t"); echo "--- tdpo: ${T[tdpo]} s ($TDPO_RUN)"

echo "=== [4/4] evaluate on held-out prompts: TDPO2 policy vs SFT reference"
t=$(now)
"$PYTHON" -u evaluate.py policy="$TDPO_RUN" reference="$SFT_RUN" prompts="$TEST" \
    samples_per_prompt="$EVAL_SAMPLES_PER_PROMPT" max_new_tokens="$MAX_NEW_TOKENS" seed=$((SEED + 1234)) \
    out="$DATA_DIR/eval.json"
T[evaluate]=$(elapsed "$t"); echo "--- evaluate: ${T[evaluate]} s"
T[total]=$(elapsed "$start_all")

timings=$(printf '"build": %s, "sft": %s, "tdpo": %s, "evaluate": %s, "total": %s' \
    "${T[build]}" "${T[sft]}" "${T[tdpo]}" "${T[evaluate]}" "${T[total]}")
"$PYTHON" demo/sentiment.py report --eval "$DATA_DIR/eval.json" --sft-run "$SFT_RUN" --tdpo-run "$TDPO_RUN" \
    --data "$TRAIN" --timings "{$timings}" --out "$DATA_DIR/summary.json"
