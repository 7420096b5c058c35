"""Ahead-of-time compile check of the real kernel launches, without a GPU (used by bench/compile_table.py and
tests/test_kernels_compiled.py).

Three parts, each generic (no kernel list, no argument names):

1. **Capture.** ``capture(...)`` is a context manager under which every launch ``kernel[grid](*args, **kwargs)``
   of a ``@triton.jit`` kernel defined in the watched modules (default: ``segfast.kernels.*``) is *recorded
   instead of run*. Tensors live on the ``meta`` device (no memory, no compute) but report ``device ==
   cuda`` to the code that asks (a ``TorchFunctionMode``), so the wrappers take their GPU path (launch
   heuristics, dtypes, strides, grid) exactly as on a GPU; ``torch.cuda.get_device_properties`` & co. answer
   for the chosen card (SM count, capability). Autotuned kernels record every config; ``triton.heuristics``
   wrappers pass through. An optional autocast emulation (linear / matmul family in the half dtype, layer norm
   and softmax family in fp32) reproduces what ``torch.autocast("cuda", dtype)`` feeds the kernels.
2. **Specialise.** ``specialise(launch, target)`` computes the signature, constexprs, alignment attributes and
   options with Triton's own JIT code path (``create_function_from_signature`` + ``JITFunction._pack_args``
   with the target's backend): pointers and ints divisible by 16 get ``tt.divisibility = 16``, ints equal to
   1 become constexprs, floats are not specialised. A recorded tensor stands in as its dtype and a data
   pointer ``BASE + storage_offset * itemsize`` (CUDA allocations are >= 256-byte aligned), so a view at an
   odd element offset loses the hint as it would on the GPU.
3. **Compile and measure.** ``compile_variant(job)`` runs ``triton.compile(ASTSource(...), target)`` and reads
   registers / stack (spill) bytes from the cubin with the ``cuobjdump`` bundled in triton, shared memory from
   the compiled metadata; ``occupancy(...)`` gives resident warps per SM for the card.

Must run in a process WITHOUT ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CARDS", "Card", "TensorArg", "Launch", "Recorder", "capture", "no_autocast", "meta_module",
           "specialise", "replay_through_jit", "variant_key", "compile_variant", "cubin_usage", "occupancy",
           "cuobjdump_path", "aot_available"]

# Every CUDA allocation is at least 256-byte aligned (the caching allocator rounds to 512 B).
BASE_PTR = 1 << 20


@dataclasses.dataclass(frozen=True)
class Card:
    """What the occupancy model and the faked ``torch.cuda`` queries need about a GPU."""
    name: str
    arch: int                  # compute capability as 90 / 80
    sms: int
    regs_per_sm: int = 65536
    smem_per_sm: int = 228 * 1024
    smem_per_block: int = 227 * 1024   # opt-in maximum for one block
    smem_reserved_per_block: int = 1024  # the driver's per-block reservation (sm_80+)
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reg_alloc_unit: int = 256  # registers, per warp
    max_regs_per_thread: int = 255
    total_memory: int = 80 * 2**30
    l2_bytes: int = 50 * 2**20


CARDS = {
    90: Card("NVIDIA H100 80GB HBM3", 90, sms=132),
    80: Card("NVIDIA A100-SXM4-80GB", 80, sms=108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024,
             l2_bytes=40 * 2**20),
}


# ------------------------------------------------------------------------------------------------------------
# 1. capture
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorArg:
    """A recorded tensor argument: what the JIT's specialisation reads (dtype, data_ptr) plus its layout."""
    dtype: torch.dtype
    ptr: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    def data_ptr(self) -> int:
        return self.ptr

    @staticmethod
    def of(t: torch.Tensor) -> "TensorArg":
        return TensorArg(t.dtype, BASE_PTR + t.storage_offset() * t.element_size(), tuple(t.shape),
                         tuple(t.stride()))


@dataclasses.dataclass
class Launch:
    module: str                 # module of the @triton.jit function
    name: str                   # its qualified name
    args: tuple                 # positional arguments, tensors as TensorArg
    kwargs: dict                # keyword arguments (constexprs, num_warps, num_stages, ...)
    grid: Optional[tuple]
    context: dict               # labels set by the caller through Recorder.context(...)


def _conv(a):
    if isinstance(a, torch.Tensor):
        return TensorArg.of(a)
    if isinstance(a, (tuple, list)):
        return type(a)(_conv(x) for x in a)
    return a


class Recorder:
    """Collects launches; ``context(**labels)`` sets the labels attached to the launches made inside it."""

    def __init__(self):
        self.launches: List[Launch] = []
        self._ctx: dict = {}

    @contextlib.contextmanager
    def context(self, **labels):
        old = self._ctx
        self._ctx = {**old, **labels}
        try:
            yield
        finally:
            self._ctx = old

    def add(self, fn, args, kwargs, grid):
        args = tuple(_conv(a) for a in args)
        kwargs = {k: _conv(v) for k, v in kwargs.items()}
        if callable(grid):
            try:
                names = [p.name for p in fn.params]
                grid = grid({**dict(zip(names, args)), **kwargs})
            except Exception:  # noqa: BLE001 - the grid is only reported
                grid = None
        grid = tuple(int(g) for g in grid) if grid is not None else None
        self.launches.append(Launch(fn.fn.__module__, fn.fn.__qualname__, args, kwargs, grid, dict(self._ctx)))


_CUDA = torch.device("cuda", 0)
_META = torch.device("meta")
_DEVICE_GET = torch._C.TensorBase.__dict__["device"]
_IS_CUDA_GET = torch._C.TensorBase.__dict__["is_cuda"]
_IS_META_GET = torch._C.TensorBase.__dict__["is_meta"]
_IS_CPU_GET = torch._C.TensorBase.__dict__["is_cpu"]


def _to_meta(a):
    if isinstance(a, torch.device):
        return _META if a.type == "cuda" else a
    if isinstance(a, str) and (a == "cuda" or a.startswith("cuda:")):
        return _META
    return a


def _autocast_sets():
    import torch.nn.functional as F
    low = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
           torch.bmm, torch.Tensor.bmm, torch.addmm, torch.baddbmm, torch.addbmm, torch.einsum,
           torch._C._nn.linear}
    high = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, torch.softmax, torch.log_softmax,
            torch.Tensor.softmax, torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss,
            F.binary_cross_entropy_with_logits, F.mse_loss, F.l1_loss, F.normalize, F.cosine_similarity}
    return low, high


class _FakeCuda(TorchFunctionMode):
    """Tensors are on ``meta``; every device query answers ``cuda:0`` and every request for a cuda device gets
    ``meta``. With ``autocast``: the ops autocast runs in half precision get half inputs, the fp32 ones fp32."""

    def __init__(self, autocast: Optional[torch.dtype] = None):
        super().__init__()
        self.autocast = autocast
        self.low, self.high = _autocast_sets()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if owner is _DEVICE_GET:
            return _CUDA
        if owner is _IS_CUDA_GET:
            return True
        if owner is _IS_META_GET or owner is _IS_CPU_GET:
            return False
        if func is torch.Tensor.cuda:
            return args[0].to(_META)
        args = tuple(_to_meta(a) for a in args)
        kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
        if self.autocast is not None:
            if func in self.low:
                args, kwargs = _cast_floats(args, kwargs, self.autocast, only=torch.float32)
            elif func in self.high:
                args, kwargs = _cast_floats(args, kwargs, torch.float32, only=(torch.float16, torch.bfloat16))
        return func(*args, **kwargs)


def _cast_floats(args, kwargs, dtype, only):
    only = only if isinstance(only, tuple) else (only,)

    def c(a):
        if isinstance(a, torch.Tensor) and a.dtype in only:
            return a.to(dtype)
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.Tensor) for x in a):
            return type(a)(c(x) for x in a)
        return a
    return tuple(c(a) for a in args), {k: c(v) for k, v in kwargs.items()}


def _fake_props(card: Card):
    import types
    return types.SimpleNamespace(
        name=card.name, major=card.arch // 10, minor=card.arch % 10, multi_processor_count=card.sms,
        total_memory=card.total_memory, regs_per_multiprocessor=card.regs_per_sm,
        max_threads_per_multi_processor=card.max_warps_per_sm * 32, warp_size=32,
        shared_memory_per_block_optin=card.smem_per_block, shared_memory_per_multiprocessor=card.smem_per_sm,
        L2_cache_size=card.l2_bytes, is_integrated=False, uuid="00000000-0000-0000-0000-000000000000")


_capture_lock = threading.Lock()
_active_mode: List["_FakeCuda"] = []


@contextlib.contextmanager
def no_autocast():
    """Inside ``capture(autocast=...)``: leave the (emulated) autocast region, as a training loop does for
    ``loss.backward()``."""
    mode = _active_mode[-1] if _active_mode else None
    saved = mode.autocast if mode is not None else None
    if mode is not None:
        mode.autocast = None
    try:
        yield
    finally:
        if mode is not None:
            mode.autocast = saved


@contextlib.contextmanager
def capture(card: Card, modules: Iterable[str] = ("segfast.kernels",), autocast: Optional[torch.dtype] = None,
            recorder: Optional[Recorder] = None):
    """Record (do not run) every launch of a ``@triton.jit`` kernel defined in ``modules`` (prefixes); build
    tensors on ``meta`` (they report cuda). Yields the Recorder. A launch of a kernel outside ``modules``
    raises (it would need a GPU)."""
    from triton.runtime import autotuner as _at
    from triton.runtime.jit import JITFunction

    from segfast.kernels import _common  # noqa: F401 - imported before patching

    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in ("", "0", "false", "no", "off", "n"):
        raise RuntimeError("kernels._aot.capture needs a process without TRITON_INTERPRET (the interpreter "
                           "replaces @triton.jit, so there is nothing to compile)")
    rec = recorder or Recorder()
    prefixes = tuple(modules)

    def jit_run(self, *args, grid, warmup, **kwargs):
        if not self.fn.__module__.startswith(prefixes):
            raise RuntimeError(f"capture: launch of {self.fn.__module__}.{self.fn.__qualname__}, outside "
                               f"the watched modules {prefixes}")
        rec.add(self, args, kwargs, grid)
        return None

    def tuner_run(self, *args, **kwargs):
        for cfg in self.configs:  # every config the tuner could pick
            self.fn.run(*args, **{**kwargs, **cfg.all_kwargs()})
        return None

    props = _fake_props(card)
    patches = [
        (JITFunction, "run", jit_run),
        (_at.Autotuner, "run", tuner_run),
        (torch.cuda, "get_device_properties", lambda device=None: props),
        (torch.cuda, "get_device_capability", lambda device=None: (card.arch // 10, card.arch % 10)),
        (torch.cuda, "get_device_name", lambda device=None: card.name),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "device_count", lambda: 1),
        (torch.cuda, "synchronize", lambda device=None: None),
    ]
    with _capture_lock:
        saved = [(obj, name, obj.__dict__.get(name, getattr(obj, name))) for obj, name, _ in patches]
        try:
            for obj, name, new in patches:
                setattr(obj, name, new)
            mode = _FakeCuda(autocast)
            _active_mode.append(mode)
            try:
                with mode:
                    yield rec
            finally:
                _active_mode.pop()
        finally:
            for obj, name, old in saved:
                setattr(obj, name, old)


def meta_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module with its parameters and buffers on ``meta`` (call outside ``capture``)."""
    return module.to(_META)


# ------------------------------------------------------------------------------------------------------------
# 2. specialise (Triton's own JIT code path)
# ------------------------------------------------------------------------------------------------------------
def _jit_function(module: str, name: str):
    from triton.runtime.jit import JITFunction
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction):  # Autotuner / Heuristics wrappers
        obj = obj.fn
    return obj


_binders: Dict[Any, Any] = {}


def specialise(launch: Launch, arch: int) -> dict:
    """signature / constexprs / attrs / options exactly as ``JITFunction.run`` computes them for ``arch``.
    Returns a picklable job dict for ``compile_variant``."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = _jit_function(launch.module, launch.name)
    key = (id(fn), arch)
    if key not in _binders:
        backend = make_backend(GPUTarget("cuda", arch, 32))
        _binders[key] = (backend, create_function_from_signature(fn.signature, fn.params, backend))
    backend, binder = _binders[key]
    kwargs = dict(launch.kwargs)
    # what JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return {"module": launch.module, "name": launch.name, "arch": arch, "signature": signature,
            "constexprs": constexprs, "attrs": attrs, "options": dict(options.__dict__)}


def replay_through_jit(launch: Launch, arch: int) -> dict:
    """The job that ``JITFunction.run`` itself builds for this launch on a device of capability ``arch``: the
    real ``run`` with a stand-in driver (target, device 0, stream 0), stopped at its compile call. Used to check
    that ``specialise`` is faithful; no GPU needed."""
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    fn = _jit_function(launch.module, launch.name)

    class _Driver:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    seen = {}

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        seen.update(signature=signature, constexprs=constexprs, attrs=attrs, options=dict(options.__dict__))
        return None  # run() returns before launching

    with _capture_lock:
        saved_active, saved_caches, saved_compile = driver._active, fn.device_caches, JITFunction._do_compile
        try:
            driver._active = _Driver()
            fn.device_caches = type(saved_caches)(fn.create_binder)
            JITFunction._do_compile = do_compile
            fn.run(*launch.args, grid=launch.grid or (1,), warmup=False, **launch.kwargs)
        finally:
            driver._active, fn.device_caches, JITFunction._do_compile = saved_active, saved_caches, saved_compile
    if not seen:
        raise RuntimeError(f"JITFunction.run of {launch.name} did not reach its compile call")
    return {"module": launch.module, "name": launch.name, "arch": arch, **seen}


def variant_key(job: dict) -> str:
    """One string per distinct compiled binary (what the JIT's kernel cache distinguishes)."""
    opts = {k: v for k, v in job["options"].items() if k != "extern_libs"}
    return repr((job["module"], job["name"], job["arch"], sorted(job["signature"].items()),
                 sorted(job["constexprs"].items()), sorted(job["attrs"].items()), sorted(opts.items())))


# ------------------------------------------------------------------------------------------------------------
# 3. compile and measure
# ------------------------------------------------------------------------------------------------------------
def cuobjdump_path() -> Optional[str]:
    import triton
    p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return p if os.path.exists(p) else shutil.which("cuobjdump")


def aot_available() -> Tuple[bool, str]:
    """(True, "") when triton's nvidia backend, its ptxas and cuobjdump are usable here, else (False, why)."""
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return False, f"triton's nvidia backend is not importable ({e})"
    import triton
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = os.path.join(bin_dir, "ptxas")
    if not os.path.exists(ptxas) and shutil.which("ptxas") is None:
        return False, "no ptxas (neither bundled with triton nor on PATH)"
    try:
        subprocess.run([ptxas if os.path.exists(ptxas) else "ptxas", "--version"], capture_output=True,
                       timeout=60, check=True)
    except Exception as e:  # noqa: BLE001
        return False, f"ptxas does not run here ({e})"
    if cuobjdump_path() is None:
        return False, "no cuobjdump (neither bundled with triton nor on PATH)"
    return True, ""


_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def cubin_usage(cubin: bytes, name: Optional[str] = None) -> dict:
    """{regs, stack, shared_static, local} of the kernel in a cubin (cuobjdump --dump-resource-usage)."""
    tool = cuobjdump_path()
    if tool is None:
        raise RuntimeError("cuobjdump not found")
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True,
                             timeout=120).stdout
    finally:
        os.unlink(path)
    blocks = re.split(r"\n\s*Function ", out)
    for b in blocks[1:] or [out]:
        fname = b.split(":", 1)[0].strip()
        if name is not None and fname != name and len(blocks) > 2:
            continue
        m = _USAGE.search(b)
        if m:
            return {"regs": int(m.group(1)), "stack": int(m.group(2)), "shared_static": int(m.group(3)),
                    "local": int(m.group(4))}
    raise RuntimeError(f"no resource usage in cuobjdump output:\n{out[-2000:]}")


def occupancy(card: Card, regs: int, shared: int, num_warps: int) -> dict:
    """Resident warps per SM and the limiting resource (CUDA occupancy calculator rules)."""
    if regs > card.max_regs_per_thread or shared > card.smem_per_block:
        return {"warps_per_sm": 0, "blocks_per_sm": 0, "limit": "does not fit"}
    regs_per_warp = math.ceil(max(regs, 1) * 32 / card.reg_alloc_unit) * card.reg_alloc_unit
    by_regs = (card.regs_per_sm // regs_per_warp) // num_warps
    smem = shared + card.smem_reserved_per_block
    by_smem = card.smem_per_sm // smem
    by_warps = card.max_warps_per_sm // num_warps
    limits = {"registers": by_regs, "shared": by_smem, "warps": by_warps, "blocks": card.max_blocks_per_sm}
    blocks = min(limits.values())
    limit = min(limits, key=lambda k: (limits[k], list(limits).index(k)))
    return {"warps_per_sm": blocks * num_warps, "blocks_per_sm": blocks, "limit": limit}


def compile_variant(job: dict) -> dict:
    """Compile one specialisation for its arch; returns the job's key fields plus regs / stack / shared /
    num_warps / occupancy / seconds, or ``error``."""
    t0 = time.perf_counter()
    res = {"key": variant_key(job), "arch": job["arch"]}
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = _jit_function(job["module"], job["name"])
        src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
        ck = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32), options=job["options"])
        md = ck.metadata
        use = cubin_usage(ck.asm["cubin"], md.name)
        shared = max(int(md.shared), use["shared_static"])
        nw = int(md.num_warps)
        occ = occupancy(CARDS[job["arch"]], use["regs"], shared, nw)
        res.update(regs=use["regs"], stack=use["stack"], local=use["local"], shared=shared, num_warps=nw,
                   num_stages=int(md.num_stages), occupancy=occ)
    except Exception as e:  # noqa: BLE001 - a failure is a result
        msg = f"{type(e).__name__}: {e}"
        res["error"] = msg[-1500:]
    res["seconds"] = round(time.perf_counter() - t0, 2)
    return res
