"""GPU sampling through NVML: one guarded wrapper, immutable snapshots, N/A on error.

Every NVML call goes through :meth:`Nvml.query`, which initialises NVML lazily (once)
and turns any failure into :data:`NA` -- a value that prints ``N/A`` and behaves like
NaN in arithmetic -- so a missing driver, an unsupported field or a GPU that fell off the
bus never raises into a view. On a machine without NVIDIA driver, :func:`take_snapshot`
returns a snapshot with no GPUs and the reason in ``error``.

:class:`GpuSampler` takes snapshots on a daemon thread; readers only call ``latest()``.
Process ids reported by NVML are the host's: inside a container with its own pid
namespace, per-process memory may not match the children's pids (fields stay N/A).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

__all__ = [
    "NA", "NaType", "Nvml", "GpuProcess", "GpuSnapshot", "GpuSystemSnapshot", "GpuSampler", "DeviceRef",
    "take_snapshot", "p2p_status", "resolve_device", "cuda_device_count", "gpu_memory_by_pid", "default_nvml",
]


class NaType(float):
    """Not available: prints ``N/A``, is falsy, and is NaN in arithmetic (like nvitop's NA)."""

    _instance: "NaType | None" = None

    def __new__(cls) -> "NaType":
        if cls._instance is None:
            cls._instance = super().__new__(cls, float("nan"))
        return cls._instance

    def __repr__(self) -> str:
        return "N/A"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        head = spec.split(".")[0].rstrip("bcdeEfFgGnosxX%,_").replace("=", ">")
        head = head[1:] if head.startswith("0") else head
        try:
            return format("N/A", head)
        except ValueError:
            return "N/A"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "NA"


NA = NaType()


def _text(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def _load_pynvml() -> ModuleType:
    import pynvml  # nvidia-ml-py

    return pynvml


class Nvml:
    """Lazy, thread-safe NVML access; every call guarded (failures give ``default``)."""

    def __init__(self, loader: Callable[[], ModuleType] = _load_pynvml) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._mod: ModuleType | None = None
        self._tried = False
        self.error: str | None = None

    def _init(self) -> ModuleType | None:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    mod = self._loader()
                    mod.nvmlInit()
                    self._mod = mod
                except Exception as e:  # ImportError, NVMLError_LibraryNotFound, DriverNotLoaded...
                    self.error = _nvml_error_text(e)
            return self._mod

    @property
    def available(self) -> bool:
        return self._init() is not None

    def query(self, func: str, *args: Any, default: Any = NA) -> Any:
        """``pynvml.<func>(*args)``, or ``default`` when NVML or the call fails."""
        mod = self._init()
        if mod is None:
            return default
        fn = getattr(mod, func, None)
        if fn is None:
            return default
        try:
            return fn(*args)
        except Exception:
            return default

    def constant(self, name: str, default: Any = None) -> Any:
        mod = self._init()
        return getattr(mod, name, default) if mod is not None else default

    def shutdown(self) -> None:
        with self._lock:
            if self._mod is not None:
                try:
                    self._mod.nvmlShutdown()
                except Exception:
                    pass
            self._mod, self._tried = None, False


def _nvml_error_text(e: Exception) -> str:
    if isinstance(e, ImportError):
        return "nvidia-ml-py is not installed"
    name = type(e).__name__
    if "LibraryNotFound" in name:
        return "NVML library not found (no NVIDIA driver on this machine)"
    if "DriverNotLoaded" in name:
        return "NVIDIA driver not loaded"
    return f"NVML unavailable: {e}"


_default: Nvml | None = None
_default_lock = threading.Lock()


def default_nvml() -> Nvml:
    """The process-wide :class:`Nvml` (initialised on first use)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Nvml()
        return _default


@dataclass(frozen=True)
class GpuProcess:
    """A process using a GPU: pid (as NVML reports it) and memory in bytes (or NA)."""

    pid: int
    used_memory: float | int


@dataclass(frozen=True)
class GpuSnapshot:
    """One GPU at one moment; every number may be :data:`NA`."""

    index: int
    name: str
    uuid: str
    memory_used: float | int = NA  # bytes
    memory_total: float | int = NA  # bytes
    utilization: float | int = NA  # percent, GPU busy
    memory_utilization: float | int = NA  # percent, memory controller busy
    temperature: float | int = NA  # Celsius
    power_w: float = NA
    power_limit_w: float = NA
    processes: tuple[GpuProcess, ...] = ()

    @property
    def memory_percent(self) -> float:
        if self.memory_used is NA or self.memory_total is NA or not self.memory_total:
            return NA
        return 100.0 * self.memory_used / self.memory_total


@dataclass(frozen=True)
class GpuSystemSnapshot:
    """All GPUs of the machine at one moment."""

    time: float
    gpus: tuple[GpuSnapshot, ...] = ()
    driver_version: str | NaType = NA
    cuda_version: str | NaType = NA
    nvml_version: str | NaType = NA
    error: str | None = None  # why there is no data (no driver...), None when NVML works

    @property
    def available(self) -> bool:
        return self.error is None

    def memory_by_pid(self) -> dict[int, float]:
        """Bytes of GPU memory per pid, summed over GPUs (NA entries count as 0)."""
        out: dict[int, float] = {}
        for g in self.gpus:
            for p in g.processes:
                used = 0 if p.used_memory is NA else p.used_memory
                out[p.pid] = out.get(p.pid, 0) + used
        return out


def _cuda_text(v: Any) -> str | NaType:
    if v is NA or not isinstance(v, int):
        return NA
    return f"{v // 1000}.{(v % 1000) // 10}"


def _processes(nvml: Nvml, handle: Any) -> tuple[GpuProcess, ...]:
    seen: dict[int, GpuProcess] = {}
    for func in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
        for p in nvml.query(func, handle, default=[]) or []:
            pid = getattr(p, "pid", None)
            if not isinstance(pid, int):
                continue
            used = getattr(p, "usedGpuMemory", None)
            mem = used if isinstance(used, int) else NA
            if pid not in seen or seen[pid].used_memory is NA:
                seen[pid] = GpuProcess(pid, mem)
    return tuple(sorted(seen.values(), key=lambda p: p.pid))


def _gpu(nvml: Nvml, index: int) -> GpuSnapshot | None:
    handle = nvml.query("nvmlDeviceGetHandleByIndex", index, default=None)
    if handle is None:
        return None
    mem = nvml.query("nvmlDeviceGetMemoryInfo", handle, default=None)
    util = nvml.query("nvmlDeviceGetUtilizationRates", handle, default=None)
    power = nvml.query("nvmlDeviceGetPowerUsage", handle)
    limit = nvml.query("nvmlDeviceGetEnforcedPowerLimit", handle)
    temp_sensor = nvml.constant("NVML_TEMPERATURE_GPU", 0)
    return GpuSnapshot(
        index=index,
        name=_text(nvml.query("nvmlDeviceGetName", handle, default="N/A")),
        uuid=_text(nvml.query("nvmlDeviceGetUUID", handle, default="N/A")),
        memory_used=getattr(mem, "used", NA) if mem is not None else NA,
        memory_total=getattr(mem, "total", NA) if mem is not None else NA,
        utilization=getattr(util, "gpu", NA) if util is not None else NA,
        memory_utilization=getattr(util, "memory", NA) if util is not None else NA,
        temperature=nvml.query("nvmlDeviceGetTemperature", handle, temp_sensor),
        power_w=power / 1000.0 if power is not NA else NA,
        power_limit_w=limit / 1000.0 if limit is not NA else NA,
        processes=_processes(nvml, handle),
    )


def take_snapshot(nvml: Nvml | None = None) -> GpuSystemSnapshot:
    """A snapshot of every GPU; no GPUs (and ``error`` set) when NVML is unavailable."""
    nvml = nvml or default_nvml()
    now = time.time()
    if not nvml.available:
        return GpuSystemSnapshot(time=now, error=nvml.error or "NVML unavailable")
    count = nvml.query("nvmlDeviceGetCount", default=0)
    gpus = tuple(g for g in (_gpu(nvml, i) for i in range(count if isinstance(count, int) else 0)) if g)
    driver = nvml.query("nvmlSystemGetDriverVersion")
    cuda = nvml.query("nvmlSystemGetCudaDriverVersion_v2")
    if cuda is NA:
        cuda = nvml.query("nvmlSystemGetCudaDriverVersion")
    lib = nvml.query("nvmlSystemGetNVMLVersion")
    return GpuSystemSnapshot(
        time=now,
        gpus=gpus,
        driver_version=NA if driver is NA else _text(driver),
        cuda_version=_cuda_text(cuda),
        nvml_version=NA if lib is NA else _text(lib),
    )


def p2p_status(i: int, j: int, nvml: Nvml | None = None) -> bool | NaType:
    """Whether GPUs ``i`` and ``j`` can read each other's memory peer-to-peer (NA: unknown)."""
    nvml = nvml or default_nvml()
    hi = nvml.query("nvmlDeviceGetHandleByIndex", i, default=None)
    hj = nvml.query("nvmlDeviceGetHandleByIndex", j, default=None)
    if hi is None or hj is None:
        return NA
    index = nvml.constant("NVML_P2P_CAPS_INDEX_READ")
    if isinstance(index, tuple):  # nvidia-ml-py defines it as `0,` (a tuple), which ctypes refuses
        index = index[0] if index else None
    ok = nvml.constant("NVML_P2P_STATUS_OK", 0)
    if index is None:
        return NA
    status = nvml.query("nvmlDeviceGetP2PStatus", hi, hj, index)
    return NA if status is NA else status == ok


@dataclass(frozen=True)
class DeviceRef:
    """A CUDA device as ``CUDA_VISIBLE_DEVICES`` names it, placed on its physical GPU."""

    ident: str  # index, GPU-UUID or MIG-UUID
    gpu: int  # NVML index of the physical GPU (a MIG slice's parent)
    memory_total: float | int = NA  # bytes of the device itself (a MIG slice: its own share)
    mig: bool = False


def resolve_device(ident: str, nvml: Nvml | None = None) -> DeviceRef | None:
    """Where ``ident`` (a ``CUDA_VISIBLE_DEVICES`` entry) lives; None when NVML cannot tell.

    Indices are NVML's, which match CUDA's under ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (what the
    run plan sets). Two MIG slices of one GPU resolve to the same ``gpu``.
    """
    nvml = nvml or default_nvml()
    ident = ident.strip()
    if ident.isdigit():
        handle = nvml.query("nvmlDeviceGetHandleByIndex", int(ident), default=None)
    elif ident.startswith(("GPU-", "MIG-")):
        handle = nvml.query("nvmlDeviceGetHandleByUUID", ident, default=None)
    else:
        return None
    if handle is None:
        return None
    mig = ident.startswith("MIG-")
    if ident.isdigit():
        index: Any = int(ident)
    else:
        parent = nvml.query("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", handle, default=None) if mig else handle
        index = nvml.query("nvmlDeviceGetIndex", parent, default=None) if parent is not None else None
    if not isinstance(index, int):
        return None
    mem = nvml.query("nvmlDeviceGetMemoryInfo", handle, default=None)
    total = getattr(mem, "total", NA) if mem is not None else NA
    return DeviceRef(ident, index, total if isinstance(total, int) else NA, mig)


_COUNT_CODE = "import torch; print(torch.cuda.device_count())"


def cuda_device_count(env: Mapping[str, str] | None = None, python: str | None = None,
                      timeout_s: float = 120.0) -> int | None:
    """CUDA devices torch sees, asked in a subprocess (no CUDA state in this process); None if it cannot say.

    For containers without NVML (no ``utility`` driver capability) where CUDA still works.
    ``env``'s ``CUDA_VISIBLE_DEVICES`` (or its absence) is the child's.
    """
    child = dict(os.environ)
    if env is not None:
        child.pop("CUDA_VISIBLE_DEVICES", None)
        if "CUDA_VISIBLE_DEVICES" in env:
            child["CUDA_VISIBLE_DEVICES"] = env["CUDA_VISIBLE_DEVICES"]
    try:
        r = subprocess.run([python or sys.executable, "-c", _COUNT_CODE], capture_output=True, text=True,
                           timeout=timeout_s, env=child)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = r.stdout.strip().splitlines()
    return int(out[-1]) if r.returncode == 0 and out and out[-1].isdigit() else None


def gpu_memory_by_pid(
    pids: Iterable[int], snapshot: GpuSystemSnapshot, include_children: bool = True
) -> dict[int, float]:
    """GPU memory (bytes) used by each of ``pids`` -- with its descendants when asked.

    A supervisor passes its children's pids; vLLM's engine workers are grandchildren, so
    their memory is counted under the server's pid.
    """
    by_pid = snapshot.memory_by_pid()
    out: dict[int, float] = {}
    for pid in pids:
        tree = {pid}
        if include_children:
            tree |= _descendants(pid)
        out[pid] = sum(by_pid.get(p, 0) for p in tree)
    return out


def _descendants(pid: int) -> set[int]:
    try:
        import psutil

        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except Exception:
        return set()


@dataclass
class GpuSampler:
    """Takes a :class:`GpuSystemSnapshot` every ``interval_s`` on a daemon thread.

    Readers call :meth:`latest` (never blocks); ``on_snapshot`` (if given) is called from
    the sampler thread with each new snapshot.
    """

    interval_s: float = 1.0
    nvml: Nvml | None = None
    on_snapshot: Callable[[GpuSystemSnapshot], None] | None = None
    _latest: GpuSystemSnapshot | None = field(default=None, init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def sample(self) -> GpuSystemSnapshot:
        snap = take_snapshot(self.nvml)
        self._latest = snap
        if self.on_snapshot is not None:
            try:
                self.on_snapshot(snap)
            except Exception:
                pass
        return snap

    def latest(self) -> GpuSystemSnapshot | None:
        return self._latest

    def start(self) -> "GpuSampler":
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            snap = self.sample()
            if snap.error is not None and not snap.gpus:
                # No driver: nothing will change; sample rarely.
                self._stop.wait(max(self.interval_s, 30.0))
            else:
                self._stop.wait(self.interval_s)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "GpuSampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
