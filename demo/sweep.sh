#!/usr/bin/env bash
# The paper's controlled-sentiment comparison (Zeng et al. 2024, Fig. 2), offline (`make sweep` calls this once
# .venv exists, with its python on PATH):
#   1. the demo's VADER-labelled preference pairs (demo/sentiment.py build; cached, shared with `make demo`)
#   2. SFT on the preferred reviews: the reference of every run (skipped when $SWEEP_DIR/runs/sft/hf verifies)
#   3. Hydra multiruns of train.py from the SFT model: DPO, TDPO1, TDPO2 at every alpha in $ALPHAS, and f-DPO with
#      forward KL, each at every beta in $BETAS; each run checkpoints halfway (step-N/) and at the end
#   4. evaluate.py (a Hydra multirun) on every checkpoint: VADER reward of policy samples on held-out prompts and
#      KL(policy || SFT) on them (checkpoints whose eval.json verifies against its manifest are skipped)
#   5. demo/plot_sweep.py: the four panels into $SWEEP_DIR/sweep.png and the table $SWEEP_DIR/sweep.md
# Sized for 2 CPU cores (about 45 minutes, see README "The paper's sentiment experiment"); every size is an
# environment variable, e.g. `BETAS=0.1,0.3,1.0 N_PROMPTS=512 bash demo/sweep.sh` on a GPU. A rerun continues:
# finished stages are skipped, runs continue from their checkpoints (resume=true) and finished runs just re-export.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
SWEEP_DIR=$(realpath -m "${SWEEP_DIR:-.cache/sweep}")
DATA_DIR=${DATA_DIR:-.cache/demo}
TRAIN=$DATA_DIR/sentiment_pairs.jsonl
TEST=$DATA_DIR/sentiment_pairs_test.jsonl
MODEL=${MODEL:-smollm2-135m}
N_PROMPTS=${N_PROMPTS:-64}              # train prompts (each gives at most one pair)
N_TEST_PROMPTS=${N_TEST_PROMPTS:-16}    # held-out prompts
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-40}    # review length, when building pairs and when evaluating
BETAS=${BETAS:-0.1,0.5}                 # beta of every method (Hydra sweep syntax: comma-separated)
ALPHAS=${ALPHAS:-0.1,0.5,1.0}           # TDPO2's alpha
FDPO=${FDPO:-1}                         # 0 = leave out f-DPO (forward KL)
LR=${LR:-1e-4}
EPOCHS=${EPOCHS:-1}
BATCH_SIZE=${BATCH_SIZE:-4}
EVAL_SAMPLES_PER_PROMPT=${EVAL_SAMPLES_PER_PROMPT:-4}
SEED=${SEED:-0}

source demo/common.sh sweep

RUNS=$SWEEP_DIR/runs
SFT_RUN=$RUNS/sft
mkdir -p "$RUNS" "$DATA_DIR"
start_all=$(now)

# As run_demo.sh: short sequences, no sampling during training-time evaluation, no wandb; held-out pairs are
# evaluated (and a checkpoint written) halfway and at the end.
COMMON=(model="$MODEL" datasets="[$TRAIN]" eval_datasets="[$TEST]" seed="$SEED" eval_batch_size=16 optimizer=AdamW
        warmup_steps=2 max_length=96 max_prompt_length=64 do_first_eval=false sample_during_eval=false
        wandb.enabled=false eval_fraction=0.05 resume=true)

echo "=== [1/5] preference pairs ($N_PROMPTS train + $N_TEST_PROMPTS held-out prompts)"
t=$(now)
"$PYTHON" -u demo/sentiment.py build --out "$TRAIN" --test-out "$TEST" --n-prompts "$N_PROMPTS" \
    --n-test-prompts "$N_TEST_PROMPTS" --max-new-tokens "$MAX_NEW_TOKENS" --min-gap 0.2 --seed "$SEED" \
    --model "$MODEL" --eval-fraction 0.05
T[build]=$(elapsed "$t")
N_PAIRS=$(wc -l < "$TRAIN")
N_UPDATES=$(( N_PAIRS / BATCH_SIZE * EPOCHS ))
HALF=$(( (N_UPDATES + 1) / 2 * BATCH_SIZE ))  # examples at the one checkpoint halfway (the next would be at or past the end)

echo "=== [2/5] SFT (the reference of every run)"
t=$(now)
if [ -f "$SFT_RUN/hf/config.json" ] && "$PYTHON" checkpoints.py verify "$SFT_RUN/hf/manifest.json"; then
    echo "sweep: $SFT_RUN exists; skipping SFT"
else
    "$PYTHON" -u train.py "${COMMON[@]}" loss=sft exp_name=sweep_sft local_run_dir="$SFT_RUN" batch_size=8 lr=1e-5 \
        n_epochs=1 n_eval_examples=0 eval_every=1000000 finished_run_keeps=weights
fi
T[sft]=$(elapsed "$t")

# Disk: a finished run keeps its hf/ export and its halfway checkpoint's weights (finished_run_keeps=export:
# 2x the SFT export's weights); while it trains, its two checkpoints with AdamW state (3x each) and the export
# add up to 7x. Stop now rather than on a full disk halfway (a rerun continues either way).
n_runs=$(( $(tr ',' '\n' <<< "$BETAS" | wc -l) * (2 + FDPO + $(tr ',' '\n' <<< "$ALPHAS" | wc -l)) ))
n_done=$(find "$RUNS" -mindepth 3 -maxdepth 3 -path '*/hf/config.json' ! -path "$SFT_RUN/*" | wc -l)
weights=$(du -sb "$SFT_RUN"/hf/*.safetensors | awk '{s += $1} END {print s}')
need=$(( n_runs > n_done ? ((n_runs - n_done) * 2 + 5) * weights : 0 ))
free=$(df -B1 --output=avail "$RUNS" | tail -1)
if [ "$need" -gt "$free" ] && [ "${FORCE:-0}" != 1 ]; then
    echo "sweep: the $((n_runs - n_done)) runs left need about $((need / 2**30)) GiB, $((free / 2**30)) GiB free in $RUNS:" \
         "free space or set SWEEP_DIR to a larger disk (FORCE=1 starts anyway)" >&2
    exit 1
fi

echo "=== [3/5] DPO, TDPO1, TDPO2 (alpha in $ALPHAS), f-DPO; beta in $BETAS (Hydra multiruns, $N_PAIRS pairs x $EPOCHS epochs each)"
t=$(now)
TRAIN_ARGS=("${COMMON[@]}" batch_size="$BATCH_SIZE" lr="$LR" n_epochs="$EPOCHS" n_eval_examples=64 eval_every="$HALF"
            model.archive="$SFT_RUN/LATEST/policy.pt" finished_run_keeps=export)
multirun() {  # <family name> <run-directory pattern> <overrides...>
    local family=$1 pattern=$2
    shift 2
    "$PYTHON" -u train.py -m "${TRAIN_ARGS[@]}" exp_name="sweep_$family" "local_run_dir='$RUNS/$pattern'" \
        hydra.sweep.dir="$SWEEP_DIR/multirun/$family" "$@"
}
multirun dpo 'dpo_beta${loss.beta}' loss=dpo loss.beta="$BETAS"
multirun tdpo1 'tdpo1_beta${loss.beta}' loss=tdpo loss.if_tdpo2=false loss.beta="$BETAS"
multirun tdpo2 'tdpo2_alpha${loss.alpha}_beta${loss.beta}' loss=tdpo loss.if_tdpo2=true loss.alpha="$ALPHAS" loss.beta="$BETAS"
if [ "$FDPO" = 1 ]; then
    multirun fdpo 'fdpo_fkl_beta${loss.beta}' loss=dpo loss.divergence=forward_kl loss.beta="$BETAS"
fi
T[train]=$(elapsed "$t")

echo "=== [4/5] evaluate every checkpoint: reward and KL(policy || SFT) on held-out prompts"
t=$(now)
todo=()
for run in "$RUNS"/*/; do
    run=${run%/}
    [ "$run" = "$SFT_RUN" ] && continue
    for checkpoint in "$run"/step-* "$run"; do  # the run directory itself = its final hf/ export
        # one with an eval.json too: evaluate.py skips it if it verifies (skip_evaluated), else evaluates it again
        [ -e "$checkpoint" ] && todo+=("$checkpoint")
    done
done
if [ ${#todo[@]} -gt 0 ]; then
    policies=$(IFS=,; echo "${todo[*]}")
    "$PYTHON" -u evaluate.py -m policy="$policies" reference="$SFT_RUN" prompts="$TEST" skip_evaluated=true \
        samples_per_prompt="$EVAL_SAMPLES_PER_PROMPT" max_new_tokens="$MAX_NEW_TOKENS" seed=$((SEED + 1234)) \
        hydra.sweep.dir="$SWEEP_DIR/multirun/evaluate"
fi
T[evaluate]=$(elapsed "$t")

echo "=== [5/5] plot and table"
T[total]=$(elapsed "$start_all")
timings=$(printf '{"build": %s, "sft": %s, "train": %s, "evaluate": %s, "total": %s}' \
    "${T[build]}" "${T[sft]}" "${T[train]}" "${T[evaluate]}" "${T[total]}")
echo "$timings" > "$SWEEP_DIR/timings.json"
"$PYTHON" demo/plot_sweep.py "$RUNS" --out "$SWEEP_DIR/sweep.png" --table "$SWEEP_DIR/sweep.md"
echo "stage timings [s]: $timings"
