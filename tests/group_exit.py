"""``python -m tests.group_exit RANK PORT OUT MAIN_FAILS``: one of two gloo processes that ends with
:func:`moela.distributed.shut_down`. Rank 0 (the main process) works a second longer, then shuts down completed,
or failed when MAIN_FAILS is 1 (and exits with 1); rank 1 shuts down completed at once. Each writes to
``OUT/rank<RANK>`` the times at which it entered and left ``shut_down``."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from moela.distributed import shut_down

if __name__ == "__main__":
    rank, port, out, main_fails = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4] == "1"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if rank == 0:
        time.sleep(1.0)
    entered = time.time()
    failed = rank == 0 and main_fails
    shut_down(completed=not failed)
    (out / f"rank{rank}").write_text(f"{entered} {time.time()}")
    sys.exit(1 if failed else 0)
