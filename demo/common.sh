# Sourced by run_demo.sh and sweep.sh: offline environment, thread count, stage timers.
# usage: source demo/common.sh <name printed in messages>

export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
# With other jobs on the cores, 2 OpenMP threads per process spin against each other and every small
# op waits for a time slice (2-5x slower here); one thread is then much faster. Idle machine: torch's default.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    load=$(cut -d' ' -f1 /proc/loadavg) cores=$(nproc --all)
    if awk -v l="$load" -v n="$cores" 'BEGIN { exit !(l >= n) }'; then
        export OMP_NUM_THREADS=1
        echo "$1: machine busy (load average $load on $cores cores): one thread per process"
    fi
fi

declare -A T  # stage -> seconds
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
