"""train.py under torchrun with rank 1 stopping itself with SIGSTOP (a hung rank: alive, silent) at a chosen
point, for tests/test_hung_rank.py: STOP_RANK_AT=update (as its 4th update starts) or checkpoint (before it
writes its shards of the second checkpoint). The other arguments are train.py's."""
import os
import signal
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch.distributed.checkpoint as dcp  # noqa: E402

import trainers  # noqa: E402


# torchrun SIGKILLs a stopped rank 30 s after the other ranks have exited (the timeout of its _stop_workers, which
# --shutdown-timeout does not reach): this watchdog does what torchrun does, as soon as every other rank of the
# job has exited, so that the test does not wait those 30 s out. It never touches the stopped rank before then.
WATCHDOG = """
import os, signal, sys, time
stopped = int(sys.argv[1])
def parent_and_state(pid):
    fields = open(f'/proc/{pid}/stat').read().rsplit(')', 1)[1].split()
    return int(fields[1]), fields[0]
agent = parent_and_state(stopped)[0]
def other_ranks_alive():
    alive = False
    for name in os.listdir('/proc'):
        if name.isdigit() and int(name) != stopped:
            try:
                parent, state = parent_and_state(int(name))
            except (OSError, IndexError, ValueError):
                continue
            alive |= parent == agent and state != 'Z'
    return alive
while os.path.exists(f'/proc/{agent}') and other_ranks_alive():
    time.sleep(0.5)
try:
    os.kill(stopped, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


def stop():
    print(f'rank {os.environ["RANK"]}: stopping myself (SIGSTOP)', flush=True)
    subprocess.Popen([sys.executable, '-c', WATCHDOG, str(os.getpid())], start_new_session=True)
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
