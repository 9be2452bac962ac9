"""Run by tests/test_distributed.py under torchrun (2 processes) to test helpers.torchrun_worker: rank 0 ends
by SIGABRT (os.abort, as a native crash in gloo or the allocator ends a process) or raises an AssertionError,
as the file WORK_DIR/mode says, unless WORK_DIR is the fresh directory of a second launch ('again'); rank 1
waits for it in a collective. Prints 'crash worker ok' per rank when it passes."""
import os
import sys

import torch.distributed as dist


def main(work_dir):
    dist.init_process_group('gloo')
    with open(os.path.join(work_dir, 'mode')) as f:
        mode = f.read().strip()
    if dist.get_rank() == 0 and os.path.basename(work_dir) != 'again':
        if mode == 'abort':
            os.abort()
        assert mode != 'raise', 'planted assertion'
    dist.barrier()
    print(f'rank {dist.get_rank()}: crash worker ok', flush=True)
    dist.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
