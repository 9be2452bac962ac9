#!/usr/bin/env bash
# The paper's Anthropic HH experiment (Zeng et al. 2024, Table 1) as one command, offline on CPU by default
# (`make hh` calls this once .venv exists, with its python on PATH):
#   1. SFT on the chosen responses of the training pairs (the reference of every method)
#   2. DPO, TDPO1, TDPO2 (METHODS; fdpo and ipo too) each from the SFT model, on the same training pairs
#   3. demo/hh_score.py: every held-out pair scored under every method and the SFT model (log-probabilities,
#      SeqKL), and the entropy of each model's samples
#   4. demo/hh_report.py: $HH_DIR/hh.json, hh.md (beside the paper's numbers) and hh.png
# The held-out pairs: HOLDOUT of DATA's prompts (train.py's eval_fraction: a stable hash of the prompt), never
# trained on; with EVAL_DATA set, all of DATA trains and every pair of EVAL_DATA is scored. VALIDATE=1 tunes
# honestly: it trains on the training part less a validation slice (VALIDATION more of its prompts) and scores
# that slice only, never the reported pairs (use another HH_DIR). Every size is an environment variable; a rerun
# continues where it stopped (runs resume from their checkpoints, finished runs and complete scores are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
HH_DIR=$(realpath -m "${HH_DIR:-.cache/hh}")
SHARED=${SHARED:-../shared}              # the shared folder beside the clone
DEFAULT_DATA=$SHARED/data/hh-rlhf-harmless-sample/rows.jsonl.gz
DATA=${DATA:-$DEFAULT_DATA}             # training pairs (any format train.py reads; HH rows by default)
EVAL_DATA=${EVAL_DATA:-}                # held-out pairs; empty = HOLDOUT of DATA's prompts
HOLDOUT=${HOLDOUT:-0.25}                # share of DATA's prompts held out (0.25 of the sample: 453 pairs)
MODEL=${MODEL:-smollm2-135m}
METHODS=${METHODS:-dpo,tdpo1,tdpo2}     # of dpo, tdpo1, tdpo2, fdpo (f-DPO, forward KL), ipo
N_SFT=${N_SFT:-256}                     # SFT examples (chosen responses; all = EPOCHS passes)
N_TRAIN=${N_TRAIN:-256}                 # pairs each method trains on (n_examples; all = EPOCHS passes)
EPOCHS=${EPOCHS:-1}                     # at most this many passes over the training part
BATCH_SIZE=${BATCH_SIZE:-8}
OPTIMIZER=${OPTIMIZER:-AdamW}
LR=${LR:-2e-5}                          # AdamW, every method (tuned with VALIDATE=1: see demo/README.md)
SFT_LR=${SFT_LR:-1e-5}
WARMUP=${WARMUP:-4}                     # linear warmup updates
BETA=${BETA:-0.1}
ALPHA=${ALPHA:-0.5}                     # TDPO2's alpha
MAX_LENGTH=${MAX_LENGTH:-512}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-256}
N_GEN=${N_GEN:-64}                      # held-out prompts sampled per model for the entropy (0 = none)
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64}
SCORE_DTYPE=${SCORE_DTYPE:-float32}     # the dtype hh_score.py loads the models in (bfloat16 for large ones)
SEEDS=${SEEDS:-0}                       # comma-separated; more than one: one $HH_DIR/seed<S>/ each
VALIDATE=${VALIDATE:-0}
VALIDATION=${VALIDATION:-0.15}
CHECKPOINT_EVERY=${CHECKPOINT_EVERY:-128}   # examples between checkpoints (what a kill can lose)
EXTRA=${EXTRA:-}                        # more train.py overrides, e.g. "trainer=FSDPTrainer model.fsdp_policy_mp=bfloat16"

source demo/common.sh hh

if [ "$DATA" = "$DEFAULT_DATA" ] && [ ! -e "$DATA" ]; then
    echo "hh: no training data: $DATA is absent ($SHARED is not beside this clone); point DATA at HH-format" \
         "pairs (any format train.py reads), e.g. DATA=/path/to/hh-rlhf/harmless-base/train.jsonl.gz make hh" >&2
    exit 1
fi
for m in ${METHODS//,/ }; do
    case $m in dpo|tdpo1|tdpo2|fdpo|ipo) ;; *) echo "hh: unknown method '$m' in METHODS; valid: dpo, tdpo1, tdpo2, fdpo, ipo" >&2; exit 1 ;; esac
done
abspath() { if [ -e "$1" ]; then realpath "$1"; else echo "$1"; fi; }  # a hub id stays as it is
DATA=$(abspath "$DATA")
[ -n "$EVAL_DATA" ] && EVAL_DATA=$(abspath "$EVAL_DATA")
read -r -a EXTRA_ARGS <<< "$EXTRA"

# Which pairs train and which are scored (the same overrides for train.py and hh_score.py).
SCORE_ARGS=()
if [ -n "$EVAL_DATA" ] && [ "$VALIDATE" = 1 ]; then
    DATA_ARGS=(datasets="[$DATA]" eval_fraction="$VALIDATION")
elif [ -n "$EVAL_DATA" ]; then
    DATA_ARGS=(datasets="[$DATA]" eval_datasets="[$EVAL_DATA]")
elif [ "$VALIDATE" = 1 ]; then
    DATA_ARGS=(datasets="[$DATA]" eval_fraction="$(awk -v a="$HOLDOUT" -v b="$VALIDATION" 'BEGIN { print a + b }')")
    SCORE_ARGS=(--validation-of "$HOLDOUT")
else
    DATA_ARGS=(datasets="[$DATA]" eval_fraction="$HOLDOUT")
fi

examples() { if [ "$1" = all ]; then echo null; else echo "$1"; fi; }  # all = no n_examples limit

method_args() {  # <method> -> the loss overrides
    case $1 in
        dpo) echo "loss=dpo loss.beta=$BETA" ;;
        tdpo1) echo "loss=tdpo loss.if_tdpo2=false loss.beta=$BETA" ;;
        tdpo2) echo "loss=tdpo loss.if_tdpo2=true loss.alpha=$ALPHA loss.beta=$BETA" ;;
        fdpo) echo "loss=dpo loss.divergence=forward_kl loss.beta=$BETA" ;;
        ipo) echo "loss=ipo loss.beta=$BETA" ;;
    esac
}

run_seed() {  # <seed> <output directory>
    local seed=$1 out=$2
    local runs=$out/runs start_seed
    mkdir -p "$runs"
    start_seed=$(now)
    # No evaluation while training (the held-out pairs are scored after, the same way for every method), a
    # checkpoint every CHECKPOINT_EVERY examples (the newest kept) so that a rerun continues; a finished run
    # keeps no optimizer state: the SFT run its weights (the methods' model.archive), a method its hf/ export.
    local common=(model="$MODEL" seed="$seed" "${DATA_ARGS[@]}" max_length="$MAX_LENGTH"
                  max_prompt_length="$MAX_PROMPT_LENGTH" optimizer="$OPTIMIZER" warmup_steps="$WARMUP" batch_size="$BATCH_SIZE"
                  n_eval_examples=0 sample_during_eval=false wandb.enabled=false resume=true
                  checkpoint_every="$CHECKPOINT_EVERY" keep_checkpoints=1 "${EXTRA_ARGS[@]}")

    echo "=== [1/4] SFT on $N_SFT chosen responses (seed $seed)"
    local t
    t=$(now)
    "$PYTHON" -u train.py "${common[@]}" loss=sft exp_name=hh_sft local_run_dir="$runs/sft" lr="$SFT_LR" \
        n_epochs="$EPOCHS" n_examples="$(examples "$N_SFT")" finished_run_keeps=weights
    T[sft]=$(elapsed "$t")

    echo "=== [2/4] $METHODS from the SFT model ($N_TRAIN pairs each, lr $LR, beta $BETA)"
    t=$(now)
    for m in ${METHODS//,/ }; do
        read -r -a loss_args <<< "$(method_args "$m")"
        local tm
        tm=$(now)
        "$PYTHON" -u train.py "${common[@]}" "${loss_args[@]}" exp_name="hh_$m" local_run_dir="$runs/$m" lr="$LR" \
            n_epochs="$EPOCHS" n_examples="$(examples "$N_TRAIN")" model.archive="$runs/sft/LATEST/policy.pt" finished_run_keeps=export
        T[train_$m]=$(elapsed "$tm")
    done
    T[train]=$(elapsed "$t")

    echo "=== [3/4] score the held-out pairs and sample (sft,$METHODS)"
    t=$(now)
    "$PYTHON" -u demo/hh_score.py --runs "$runs" --out "$out" --models "sft,$METHODS" --n-gen "$N_GEN" \
        --max-new-tokens "$MAX_NEW_TOKENS" --seed "$seed" --dtype "$SCORE_DTYPE" "${SCORE_ARGS[@]}" -- model="$MODEL" "${DATA_ARGS[@]}" \
        max_length="$MAX_LENGTH" max_prompt_length="$MAX_PROMPT_LENGTH" "${EXTRA_ARGS[@]}"
    T[score]=$(elapsed "$t")

    echo "=== [4/4] table and figure"
    T[total]=$(elapsed "$start_seed")
    local timings config
    timings=$(for k in "${!T[@]}"; do printf '"%s": %s\n' "$k" "${T[$k]}"; done | sort | paste -sd, -)
    echo "{$timings}" > "$out/timings.json"
    config=$(printf '{"data": "%s", "eval_data": "%s", "holdout": %s, "validate": %s, "model": "%s", "methods": "%s",
"n_sft": %s, "n_train": %s, "epochs": %s, "batch_size": %s, "lr": %s, "sft_lr": %s, "warmup_steps": %s, "beta": %s,
"alpha": %s, "max_length": %s, "max_prompt_length": %s, "n_gen": %s, "max_new_tokens": %s, "seed": %s, "extra": "%s",
"optimizer": "%s", "seconds": {%s}}' "$DATA" "$EVAL_DATA" "$HOLDOUT" "$VALIDATE" "$MODEL" "$METHODS" "$N_SFT" "$N_TRAIN" \
        "$EPOCHS" "$BATCH_SIZE" "$LR" "$SFT_LR" "$WARMUP" "$BETA" "$ALPHA" "$MAX_LENGTH" "$MAX_PROMPT_LENGTH" "$N_GEN" \
        "$MAX_NEW_TOKENS" "$seed" "$EXTRA" "$OPTIMIZER" "$timings")
    "$PYTHON" demo/hh_report.py --out "$out" --models "sft,$METHODS" --beta "$BETA" --config "$config"
    echo "hh: stage timings [s]: {$timings}"
}

IFS=, read -r -a seeds <<< "$SEEDS"
if [ ${#seeds[@]} -eq 1 ]; then
    run_seed "${seeds[0]}" "$HH_DIR"
else
    for seed in "${seeds[@]}"; do
        T=()
        run_seed "$seed" "$HH_DIR/seed$seed"
    done
fi
