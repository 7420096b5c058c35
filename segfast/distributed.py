"""Rank / world helpers for ``torchrun`` (and single-process runs, where they are no-ops).

``torchrun --nproc-per-node K ...`` starts K processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment. :func:`env_info` reads them
(a plain ``python`` run is rank 0 of 1); :func:`init` starts the process group (gloo on CPU, nccl on GPU,
``env://`` rendezvous) with a long timeout, because the final barrier of a long scoring run waits for the
slowest rank; :func:`destroy` ends it. Every helper is a no-op with a world size of 1.

Training (``segfast.train``) also uses :func:`all_reduce_sum` (kept-row counts and losses of the shards of a
global batch) and :func:`on_rank0` (rank 0 alone evaluates and writes; the others receive its JSON result, or
raise when it failed, instead of waiting forever). Payloads cross ranks as JSON bytes, never pickle.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["DistInfo", "env_info", "backend_for", "device_for", "init", "barrier", "destroy",
           "is_initialized", "process_group", "all_ok", "all_reduce_sum", "broadcast_bytes", "on_rank0",
           "RankFailed", "DEFAULT_TIMEOUT_S"]

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

    t = torch.tensor([1 if ok else 0], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _comm_device():
    """The device collectives of the default group run on: the current CUDA device under nccl, else CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values) -> list:
    """Element-wise sum over all ranks of a list of numbers (float64); the list itself without a process group."""
    values = [float(v) for v in values]
    if not is_initialized():
        return values
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


def broadcast_bytes(data: bytes | None, src: int = 0) -> bytes:
    """``data`` of rank ``src`` on every rank (the argument is ignored elsewhere); ``data`` without a group."""
    if not is_initialized():
        return bytes(data or b"")
    import torch
    import torch.distributed as dist

    dev = _comm_device()
    mine = dist.get_rank() == src
    n = torch.tensor([len(data) if mine else 0], dtype=torch.int64, device=dev)
    dist.broadcast(n, src)
    size = int(n.item())
    if size == 0:
        return b""
    if mine:
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(dev)
    else:
        buf = torch.empty(size, dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src)
    return buf.cpu().numpy().tobytes()


class RankFailed(RuntimeError):
    """Raised on the other ranks when rank 0 failed inside :func:`on_rank0` (rank 0 raises the original)."""


def on_rank0(fn, what: str = "a rank-0 step"):
    """Run ``fn()`` on rank 0 only and return its result on every rank.

    The result must be JSON-serialisable (the other ranks get its JSON round trip). When ``fn`` raises on
    rank 0, rank 0 re-raises it and every other rank raises :class:`RankFailed` naming ``what`` and the error,
    so no rank is left waiting at a later collective. Without a process group: ``fn()``."""
    if not is_initialized():
        return fn()
    import torch.distributed as dist

    if dist.get_rank() == 0:
        err, result = None, None
        try:
            result = fn()
            payload = {"ok": True, "result": result}
            text = json.dumps(payload)
        except BaseException as e:  # noqa: BLE001 -- re-raised below after telling the other ranks
            err = e
            text = json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"})
        broadcast_bytes(text.encode())
        if err is not None:
            raise err
        return result
    msg = json.loads(broadcast_bytes(None).decode())
    if not msg["ok"]:
        raise RankFailed(f"rank {dist.get_rank()}: {what} failed on rank 0: {msg['error']}")
    return msg["result"]


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
