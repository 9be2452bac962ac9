"""torchrun as the sbatch scripts in slurm/ run it, so that their batch shell can tell a preempted run from a
failed one: the training processes, not torchrun, handle SIGTERM and SIGUSR1 (they checkpoint and exit 75),
and it exits with the exit code of the first training process that failed (torchrun's "root cause": 75 after
a preemption checkpoint), where torchrun itself exits 1 for any failure or signal. Arguments as torchrun's;
pass `--signals-to-handle` without SIGTERM and SIGUSR1, or torchrun replaces the handlers installed here."""
import signal
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def ignore_signal(signum, frame):
    """Slurm signals every process of a job step: the training processes get the signal themselves. Unlike
    SIG_IGN, a Python handler is not inherited by the processes torchrun starts."""


if __name__ == '__main__':
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, ignore_signal)
    try:
        main()
    except ChildFailedError as e:
        print(e, file=sys.stderr, flush=True)  # each failed process and its exit code, as torchrun shows them
        _, root_cause = e.get_first_failure()
        sys.exit(root_cause.exitcode if 0 < root_cause.exitcode < 256 else 1)
