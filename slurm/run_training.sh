# Sourced by the sbatch scripts in slurm/ (not run by itself): run_training CMD... runs the training command
# CMD in the background, passes SIGTERM and SIGUSR1 to the training processes, and requeues the job after a
# preemption checkpoint. The sourcing script defines forward_signal NAME, which signals the training processes.
#
# --signal=B:... (and `scancel --batch`) signals only the batch shell, which would die of it at once and end
# the job while training runs: the shell passes it on instead. The training processes checkpoint and exit 75,
# and the job is requeued only then, after every one of them has exited (`scontrol requeue` makes Slurm kill
# the job's processes), and only if it is still running (not being cancelled or timed out). Any other exit
# code (0: training finished, even if a signal came at its end; a failure) ends the job with that code.
export TDPO_BATCH_SCRIPT_REQUEUES=1  # train.py: checkpoint and exit 75 on SIGTERM/SIGUSR1, but do not requeue

on_signal() {  # on_signal NAME: pass the signal on, once (a later SIGTERM is Slurm ending the job)
  trap '' TERM USR1
  echo "batch script: received SIG$1; passing it on to the training processes"
  forward_signal "$1" || true
}

run_training() {
  "$@" &
  TRAINING_PID=$!
  trap 'on_signal TERM' TERM
  trap 'on_signal USR1' USR1
  while kill -0 "$TRAINING_PID" 2>/dev/null; do
    wait "$TRAINING_PID" || true  # returns early whenever a trapped signal arrives
  done
  local status=0
  wait "$TRAINING_PID" || status=$?  # its exit status (bash keeps it)
  trap '' TERM USR1  # from here on, SIGTERM is Slurm ending or requeueing the job
  if [ "$status" -eq 75 ]; then
    local state
    state=$(squeue -h -j "$SLURM_JOB_ID" -o %T) || true
    if [ "$state" = RUNNING ]; then
      echo "batch script: the training processes checkpointed and exited 75; requeueing Slurm job $SLURM_JOB_ID" \
           "and exiting 75"
      scontrol requeue "$SLURM_JOB_ID" ||
        echo "batch script: the job could not be requeued; submit it again to continue (resume=true)"
    else  # scancel, the time limit: a requeue would undo a scancel
      echo "batch script: the training processes checkpointed and exited 75; not requeueing Slurm job" \
           "$SLURM_JOB_ID, which Slurm is ending (${state:-gone}); exiting 75"
    fi
  elif [ "$status" -ne 0 ]; then
    echo "batch script: the training processes failed (exit code $status); not requeueing"
  fi
  exit "$status"
}
