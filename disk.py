"""Telling a full disk from other write failures, for every writer of the run (checkpoints, the model cache).

It exists apart so that the modules that write (checkpoints.py, model_loading.py) and the one that reads collective
failures out of an exception's chain (distributed.py) share these helpers without importing each other. The one
error a full disk ends in, `DiskFullError`, is checkpoints.py's (a `CheckpointError`, which train.py and evaluate.py
turn into one line). Imports no module of the project.
"""
import errno
from typing import Iterable, Optional

LOW_SPACE = 64 * 2**20  # a write failing with less free space than this failed on a full disk


def exception_chain(error: Optional[BaseException]):
    """An exception and what caused it, in turn (__cause__, else __context__)."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def looks_like_disk_full(errors: Iterable[BaseException], free: int) -> bool:
    """Whether a failed write failed for lack of space, from what it raised (an exception and its causes) and
    the space left where it wrote: ENOSPC/EDQUOT, a library's 'No space left' message (safetensors' Rust writer
    raises no OSError), or less than LOW_SPACE free (torch's zip writer reports a full disk only as
    '[enforce fail at inline_container.cc] unexpected pos')."""
    return free < LOW_SPACE or any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
                                   or 'No space left' in str(e) for e in errors)
