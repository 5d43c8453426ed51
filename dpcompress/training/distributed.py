"""Process-group helpers for runs under ``torchrun``; all of them are no-ops in a single process.

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in the
environment; :func:`init` joins the group (gloo on CPU, nccl on CUDA) once.
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any, List, Sequence, TypeVar

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several started by torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the process group when launched by torchrun (idempotent)."""
    import torch
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return
    # Ranks meet only at the end of long work (an importance shard can take hours), so the
    # collective timeout must outlast the slowest rank's share rather than the default minutes.
    timeout = datetime.timedelta(hours=24)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    atexit.register(_leave)


def _leave() -> None:
    """Give gloo's worker threads the GIL before the interpreter shuts down.

    A gloo worker thread frees a finished collective's tensors right after waking the caller,
    and freeing a tensor made in Python takes the GIL. If the process is already exiting by
    then, Python ends that thread mid-unwind and the whole process aborts ("terminate called
    without an active exception") after its work is done. DistributedDataParallel keeps the
    process group alive until interpreter teardown (destroying the group does not join those
    threads), so the threads are given a moment, with the GIL released, to finish.
    """
    import time

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    time.sleep(0.1)


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> Any:
    """This process's device: its own GPU under torchrun with CUDA, else cuda:0 or the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def shard(items: Sequence[T]) -> List[T]:
    """This rank's share of ``items``: every world_size-th item from its rank on."""
    return list(items[rank()::world_size()])


def all_gather(obj: T) -> List[T]:
    """``obj`` from every rank, in rank order (a one-item list in a single process)."""
    import torch.distributed as dist

    if not active():
        return [obj]
    gathered: List[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
