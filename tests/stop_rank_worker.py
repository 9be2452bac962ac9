"""train.py under torchrun with rank 1 stopping itself with SIGSTOP (a hung rank: alive, silent) at a chosen
point, for tests/test_hung_rank.py: STOP_RANK_AT=update (as its 4th update starts) or checkpoint (before it
writes its shards of the second checkpoint). The other arguments are train.py's."""
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch.distributed.checkpoint as dcp  # noqa: E402

import trainers  # noqa: E402


def stop():
    print(f'rank {os.environ["RANK"]}: stopping myself (SIGSTOP)', flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)


if os.environ.get('RANK') == '1':
    if os.environ['STOP_RANK_AT'] == 'update':
        real_update = trainers.BasicTrainer.update

        def update(self, batch):
            if self.batch_counter == 3:
                stop()
            return real_update(self, batch)
        trainers.BasicTrainer.update = update
    else:
        real_save, saves = dcp.save, []

        def save(*args, **kwargs):
            saves.append(1)
            if len(saves) == 2:
                stop()
            return real_save(*args, **kwargs)
        dcp.save = save

if __name__ == '__main__':
    import runpy
    sys.argv = [os.path.join(ROOT, 'train.py'), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name='__main__')  # as `python train.py`, with the patched modules
