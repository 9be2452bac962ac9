"""`python tests/inject_oom.py <train.py overrides>` (or under torchrun): train.py, with BasicTrainer.update raising
an out-of-memory error at one update, as INJECT_OOM=KIND:UPDATE[:RANK] says (KIND MemoryError or OutOfMemoryError;
RANK: only on that rank, default every rank). Used by tests/test_memory.py."""
import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import trainers  # noqa: E402

kind, at_update, *only_rank = os.environ['INJECT_OOM'].split(':')
update = trainers.BasicTrainer.update


def update_that_runs_out(self, batch):
    if self.batch_counter + 1 == int(at_update) and (not only_rank or self.rank == int(only_rank[0])):
        raise MemoryError() if kind == 'MemoryError' else torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    return update(self, batch)


trainers.BasicTrainer.update = update_that_runs_out
if __name__ == '__main__':  # train.py as its own script, so that Hydra finds config/ beside it
    sys.argv[0] = os.path.join(ROOT, 'train.py')
    runpy.run_path(sys.argv[0], run_name='__main__')
