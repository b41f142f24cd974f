"""GPU sampling: guarded NVML calls, immutable snapshots with N/A, per-process memory.

NVML is faked at its boundary (tests/fixtures/fake_nvml.py); the no-driver path runs the
real pynvml on this CPU machine.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from fake_nvml import make_fake_nvml  # noqa: E402

from vlmrl_tui.gpu import (  # noqa: E402
    NA,
    DeviceRef,
    GpuSampler,
    Nvml,
    cuda_device_count,
    gpu_memory_by_pid,
    p2p_status,
    resolve_device,
    take_snapshot,
)


def _nvml(**kw: object) -> Nvml:
    mod = make_fake_nvml(**kw)  # type: ignore[arg-type]
    return Nvml(loader=lambda: mod)


def test_snapshot_of_two_gpus() -> None:
    snap = take_snapshot(_nvml(gpus=2, processes={1: [(4242, 3 * 2**30)]}))
    assert snap.available and snap.error is None
    assert snap.driver_version == "550.54.15" and snap.cuda_version == "12.4"
    assert [g.index for g in snap.gpus] == [0, 1]
    g1 = snap.gpus[1]
    assert g1.name == "NVIDIA H100 80GB HBM3" and g1.uuid == "GPU-0001"
    assert g1.memory_used == 2 * 2**30 and g1.memory_total == 80 * 2**30
    assert math.isclose(g1.memory_percent, 2.5)
    assert (g1.utilization, g1.temperature, g1.power_w, g1.power_limit_w) == (51, 41, 150.0, 700.0)
    assert g1.processes[0].pid == 4242 and g1.processes[0].used_memory == 3 * 2**30
    with pytest.raises(dataclasses.FrozenInstanceError):
        g1.temperature = 3  # type: ignore[misc]


def test_a_failing_nvml_call_gives_na_not_an_exception() -> None:
    snap = take_snapshot(_nvml(gpus=1, broken={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetMemoryInfo",
                                              "nvmlSystemGetCudaDriverVersion_v2"}))
    g = snap.gpus[0]
    assert g.power_w is NA and g.memory_used is NA and g.memory_percent is NA
    assert g.utilization == 50  # the other fields still come through
    assert snap.cuda_version is NA  # the _v2 query failed and the old one does not exist in the fake
    assert f"{g.power_w:>6.1f}" == "   N/A" and str(g.memory_used) == "N/A"


def test_na_behaves_like_nan_and_prints_na() -> None:
    assert not NA and math.isnan(NA + 1) and not (NA > 0) and not (NA < 0)
    assert repr(NA) == "N/A" and f"{NA:.2f}" == "N/A"


def test_no_driver_is_reported_not_raised() -> None:
    snap = take_snapshot(_nvml(no_library=True))
    assert not snap.available and snap.gpus == ()
    assert "no NVIDIA driver" in (snap.error or "")


def test_real_nvml_on_this_machine_does_not_crash() -> None:
    # This CPU machine has no driver: the real pynvml raises on init, the snapshot says why.
    code = ("from vlmrl_tui.gpu import take_snapshot; s = take_snapshot(); "
            "print(len(s.gpus), s.error is not None or len(s.gpus) > 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == "True"


def test_nvml_is_initialised_once() -> None:
    mod = make_fake_nvml(gpus=1)
    nvml = Nvml(loader=lambda: mod)
    take_snapshot(nvml)
    take_snapshot(nvml)
    assert mod.calls.count("nvmlInit") == 1  # type: ignore[attr-defined]


def test_p2p_status() -> None:
    assert p2p_status(0, 1, _nvml(gpus=2, p2p=True)) is True
    assert p2p_status(0, 1, _nvml(gpus=2, p2p=False)) is False
    assert p2p_status(0, 5, _nvml(gpus=2)) is NA  # no such GPU


def test_gpu_memory_of_a_process_tree() -> None:
    # A real child and grandchild; NVML reports memory for the grandchild (like a vLLM worker).
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
        "print(c.pid, flush=True); time.sleep(30)")], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        snap = take_snapshot(_nvml(gpus=2, processes={0: [(child, 2**30)], 1: [(child, 2**29), (99999999, 5)]}))
        mem = gpu_memory_by_pid([parent.pid], snap)
        assert mem == {parent.pid: 2**30 + 2**29}
        assert gpu_memory_by_pid([parent.pid], snap, include_children=False) == {parent.pid: 0}
    finally:
        import psutil

        for p in psutil.Process(parent.pid).children(recursive=True):
            p.kill()
        parent.kill()
        parent.wait()


def test_sampler_thread_keeps_the_latest_snapshot() -> None:
    seen = []
    sampler = GpuSampler(interval_s=0.02, nvml=_nvml(gpus=1), on_snapshot=seen.append)
    with sampler:
        deadline = time.monotonic() + 5
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(seen) >= 3
    latest = sampler.latest()
    assert latest is not None and latest.gpus[0].index == 0
    assert sampler._thread is None  # stopped


def _ctypes_like_p2p(mod: object, ok_pairs: set[frozenset[int]] | None = None) -> None:
    """nvidia-ml-py's real quirks: ``NVML_P2P_CAPS_INDEX_READ = 0,`` is a tuple, and ctypes
    rejects a tuple argument."""

    def status(a: dict[str, int], b: dict[str, int], index: object) -> int:
        if not isinstance(index, int):
            raise TypeError("Don't know how to convert parameter 3")
        pair = frozenset((a["index"], b["index"]))
        return 0 if ok_pairs is None or pair in ok_pairs else 5

    mod.NVML_P2P_CAPS_INDEX_READ = (0,)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetP2PStatus = status  # type: ignore[attr-defined]


def test_p2p_status_with_the_tuple_constant_of_real_nvidia_ml_py() -> None:
    import pynvml

    assert pynvml.NVML_P2P_CAPS_INDEX_READ == (0,)  # the quirk this guards against is still there
    mod = make_fake_nvml(gpus=3)
    _ctypes_like_p2p(mod, ok_pairs={frozenset((0, 1))})
    nvml = Nvml(loader=lambda: mod)
    assert p2p_status(0, 1, nvml) is True
    assert p2p_status(1, 2, nvml) is False


def _with_mig(mod: object) -> None:
    """Two MIG slices (20 GiB each) of GPU 0, and UUID lookups, as NVML answers them."""
    slices = {"MIG-aaaa": {"index": 0, "mig": 1}, "MIG-bbbb": {"index": 0, "mig": 2}}

    def by_uuid(uuid: str) -> dict[str, int]:
        if uuid in slices:
            return slices[uuid]
        if uuid.startswith("GPU-") and uuid[4:].isdigit():
            return {"index": int(uuid[4:])}
        raise RuntimeError("NVML_ERROR_NOT_FOUND")

    real_mem = mod.nvmlDeviceGetMemoryInfo  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByUUID = by_uuid  # type: ignore[attr-defined]
    mod.nvmlDeviceGetDeviceHandleFromMigDeviceHandle = lambda h: {"index": h["index"]}  # type: ignore[attr-defined]
    mod.nvmlDeviceGetIndex = lambda h: h["index"]  # type: ignore[attr-defined]
    mod.nvmlDeviceGetMemoryInfo = (  # type: ignore[attr-defined]
        lambda h: types.SimpleNamespace(total=20 * 2**30, used=0, free=20 * 2**30) if "mig" in h else real_mem(h))


def test_resolve_device_places_indices_uuids_and_mig_slices() -> None:
    mod = make_fake_nvml(gpus=2)
    _with_mig(mod)
    nvml = Nvml(loader=lambda: mod)
    assert resolve_device("1", nvml) == DeviceRef("1", 1, 80 * 2**30)
    assert resolve_device("GPU-0001", nvml) == DeviceRef("GPU-0001", 1, 80 * 2**30)
    a, b = resolve_device("MIG-aaaa", nvml), resolve_device("MIG-bbbb", nvml)
    assert a is not None and b is not None and a.gpu == b.gpu == 0 and a.mig
    assert a.memory_total == 20 * 2**30  # the slice's own memory, not the GPU's
    assert resolve_device("7", nvml) is None and resolve_device("MIG-zzzz", nvml) is None
    assert resolve_device("nonsense", nvml) is None


def test_cuda_device_count_asks_torch_in_a_subprocess() -> None:
    # No GPU here: the real torch answers 0 (and this process never touched CUDA).
    assert cuda_device_count({}) == 0
    assert cuda_device_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert cuda_device_count({}, python="/nonexistent/python") is None
