"""Which process does what when Lightning runs several (``trainer=ddp``): rank 0 samples, scores, evaluates and
writes files; the other ranks wait for it and read what it wrote. No distributed engine of our own: the processes
are Lightning's (its launcher starts ranks 1..n-1 at the first ``trainer.fit``/``validate`` by re-running the
command), and the only primitives used here are the rank Lightning set and a ``torch.distributed`` barrier once its
process group exists.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def global_rank() -> int:
    """This process's rank: 0 in a single-process run and in the process that launched the others."""
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_main_process() -> bool:
    return global_rank() == 0


def barrier() -> None:
    """Wait for every rank, once a process group exists (before that there is only rank 0, or ranks that Lightning
    started after rank 0 had finished everything before its first ``fit``)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[bool]:
    """Rank 0 runs the block first (and writes what it produces); the others wait, then run it (and read).

    Yields whether this is the main process, so a block can produce on rank 0 and only load elsewhere.
    """
    main = is_main_process()
    if not main:
        barrier()
    yield main
    if main:
        barrier()
