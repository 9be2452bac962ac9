"""Stop signals: SIGTERM (preemption, `kill`) and SIGUSR1 (Slurm's --signal before the time limit) end a run
with a checkpoint instead of killing it.

It exists apart so that the two places that act on them, train.py (catches them as each training process starts,
ignores them while it exits after a checkpoint) and the trainer's loop (checks after each update), share one
record of the signal received, and so that this process-wide state lives in no module of general helpers.
"""
import signal
from typing import Optional

import utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption, the time limit (Slurm's --signal), `kill`
_stop_signal = None  # the last of STOP_SIGNALS this process received since catch_stop_signals


def catch_stop_signals():
    """From now on SIGTERM and SIGUSR1 do not kill this process: the trainer stops after its current update,
    with a checkpoint, or before its first one. train.py calls it as each training process starts, so that a
    signal while the models load ends the run as preempted (exit 75, requeued under Slurm), not as failed."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)


def received_stop_signal() -> Optional[int]:
    """The last of STOP_SIGNALS this process received since catch_stop_signals, else None."""
    return _stop_signal


def _on_stop_signal(signum, frame):
    global _stop_signal
    _stop_signal = signum
    try:
        utils.rank0_print(f'received signal {signum}: will checkpoint and stop after the current update')
    except RuntimeError:  # it interrupted a print to stdout ("reentrant call"): the signal is recorded all the same
        pass
