"""Rank / world helpers for ``torchrun`` (and single-process runs, where they are no-ops).

``torchrun --nproc-per-node K ...`` starts K processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment. :func:`env_info` reads them
(a plain ``python`` run is rank 0 of 1); :func:`init` starts the process group (gloo on CPU, nccl on GPU,
``env://`` rendezvous) with a long timeout, because the final barrier of a long scoring run waits for the
slowest rank; :func:`destroy` ends it. Every helper is a no-op with a world size of 1.
"""
from __future__ import annotations

import datetime as _dt
import os
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["DistInfo", "env_info", "backend_for", "device_for", "init", "barrier", "destroy",
           "is_initialized", "process_group", "all_ok", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 7 * 24 * 3600  # a barrier may wait for a whole long scoring run


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(env, name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r}: expected an integer") from None


def env_info(env=None) -> DistInfo:
    """Rank and world from the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE)."""
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    rank = _env_int(env, "RANK", 0)
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    local_world = _env_int(env, "LOCAL_WORLD_SIZE", world)
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE={world}: expected >= 1")
    if not 0 <= rank < world:
        raise ValueError(f"environment variable RANK={rank}: expected 0 <= RANK < WORLD_SIZE={world}")
    if not 0 <= local_rank < max(local_world, 1):
        raise ValueError(f"environment variable LOCAL_RANK={local_rank}: expected 0 <= LOCAL_RANK < "
                         f"LOCAL_WORLD_SIZE={local_world}")
    return DistInfo(rank, world, local_rank, local_world)


def backend_for(device) -> str:
    """'nccl' for a CUDA device, 'gloo' otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def device_for(device, info: DistInfo | None = None) -> str:
    """The device of this rank: a bare 'cuda' becomes 'cuda:<LOCAL_RANK>'; anything else is kept."""
    info = env_info() if info is None else info
    d = str(device)
    if d == "cuda":
        return f"cuda:{info.local_rank}"
    return d


def is_initialized() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def init(device="cpu", timeout_s: float = DEFAULT_TIMEOUT_S, info: DistInfo | None = None) -> bool:
    """Start the default process group when the world size is > 1 and none is running.

    Returns True when this call started it (so the caller should :func:`destroy` it)."""
    info = env_info() if info is None else info
    if not info.distributed or is_initialized():
        return False
    import torch
    import torch.distributed as dist

    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={info.world_size} but {missing} not set: start the processes with "
                           "torchrun (e.g. torchrun --nproc-per-node 2 -m segfast score ...)")
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=info.world_size,
                            timeout=_dt.timedelta(seconds=float(timeout_s)))
    return True


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if not is_initialized():
        return
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_ok(ok: bool) -> bool:
    """True when ``ok`` is true on every rank (also a barrier); ``ok`` itself without a process group.

    Used where one rank may fail alone (e.g. rank 0 checking the output directory), so that the others raise
    instead of waiting at a barrier forever."""
    if not is_initialized():
        return bool(ok)
    import torch
    import torch.distributed as dist

    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def destroy() -> None:
    if is_initialized():
        import torch.distributed as dist

        dist.destroy_process_group()


@contextmanager
def process_group(device="cpu", timeout_s: float = DEFAULT_TIMEOUT_S):
    """``with process_group(device) as info:`` -- init from the environment, destroy on exit if started here."""
    info = env_info()
    started = init(device, timeout_s, info)
    try:
        yield info
    finally:
        if started:
            destroy()
