"""Idle cost of the dashboard on each tab: CPU of a real ``vlmrl-tui --attach`` in a terminal.

The dashboard runs as its own process in a pseudo-terminal of 130x42 (the Linux driver, its
escape-sequence output read and discarded here), attached to a run directory built like
tests/tui_rundir.py's. A writer process appends what a slow live run writes, once a
second: one metric record (with its time stamp and weights version), a few trainer and
server log lines, and every 4th step the step's rollouts with their PNGs. The run's
processes are real (the writer is the "trainer", a sleeper the "server") so the stats
worker samples them as it would. For each round and each tab (keys 1, 2, 3), after a
warm-up, the dashboard process's CPU time (psutil, all its threads) is measured over a
window and reported as % of one core; the summary line is on screen on every tab.

    python benchmarks/tui_idle.py                        # 3 rounds x 3 tabs x 20 s
    python benchmarks/tui_idle.py --rounds 5 --seconds 30 --json idle.json
    python benchmarks/tui_idle.py --start-steps 10000 --tabs metrics   # a long run

Figures are printed (per tab: median and range over rounds; load average before and
after); nothing is asserted. Target: < 3% of a core on every tab.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import pty
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backend.rundir import RunDirectory, write_json_atomic  # noqa: E402
from tests.tui_rundir import make_run_dir, run_json  # noqa: E402

COLS, ROWS = 130, 42
TABS = {"logs": b"1", "metrics": b"2", "rollouts": b"3"}
START_STEPS = 40  # steps already in the run when the dashboard attaches (--start-steps)

WRITER = r"""
import json, math, sys, time
sys.path.insert(0, sys.argv[1])
from backend import records as r
from backend.rundir import RunDirectory
from tests.tui_rundir import metrics, rollouts
rd = RunDirectory(sys.argv[2])
step = int(sys.argv[3])
while True:
    step += 1
    rec = dict(metrics(1, 100_000)[0], **{r.STEP: step})
    rec[r.TIME], rec[r.STEP_S], rec[r.WEIGHT_VERSION] = time.time(), 1.0, step
    rec[r.REWARD_MEAN] = round(0.5 + 0.3 * math.sin(step / 20), 4)
    with open(rd.metrics, "a") as f:
        f.write(json.dumps(rec) + "\n")
    with open(rd.log("trainer"), "a") as f:
        for k in range(4):
            f.write(f"\x1b[32mINFO\x1b[0m step {step} micro-batch {k}: loss {0.01 * k:.4f} tokens/s 912\n")
    with open(rd.log("server"), "a") as f:
        f.write(f'INFO:     127.0.0.1:41000 - "POST /v1/chat/completions HTTP/1.1" 200 OK ({step})\n')
    if step % 4 == 0:
        with open(rd.rollouts, "a") as f:
            for line in rollouts(rd, [step], 100_000):
                f.write(json.dumps(line) + "\n")
    time.sleep(1.0)
"""


def live_run_dir(path: Path, trainer_pid: int, server_pid: int, steps: int = START_STEPS) -> Path:
    """The fixture run of ``steps`` steps with :func:`live_run_dir_pids`' run.json."""
    run_dir = make_run_dir(path, steps=steps, max_steps=100_000, status="running", rollout_steps=[steps])
    live_run_dir_pids(run_dir, trainer_pid, server_pid)
    return run_dir


def live_run_dir_pids(run_dir: Path, trainer_pid: int, server_pid: int) -> None:
    """run.json of a running run whose processes are alive (the writer and a sleeper) and whose
    supervisor is on "another host" (the dashboard cannot check that pid, so it trusts run.json)."""
    info = run_json("running", server_pid=server_pid, trainer_pid=trainer_pid, max_steps=100_000)
    info["host"], info["ended_at"] = "another-host", None
    for proc in info["processes"].values():
        proc["status"], proc["ended_at"], proc["exit_code"] = "running", None, None
    write_json_atomic(RunDirectory(run_dir).run_json, info)


class Terminal:
    """``vlmrl-tui --attach RUN_DIR`` in a pseudo-terminal; its output is drained by a thread."""

    def __init__(self, run_dir: Path) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: become the dashboard
            os.chdir(ROOT)
            env = dict(os.environ, TERM="xterm-256color", COLORTERM="truecolor")
            os.execvpe(sys.executable, [sys.executable, "-c", "from vlmrl_tui.tui_main import main; main()",
                                        "--attach", str(run_dir)], env)
        self.pid, self.fd = pid, fd
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
        self.bytes = 0
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.proc = psutil.Process(pid)

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except OSError:
                return
            if not data:
                return
            self.bytes += len(data)

    def press(self, key: bytes) -> None:
        os.write(self.fd, key)

    def cpu(self) -> float:
        t = self.proc.cpu_times()
        return t.user + t.system

    def close(self) -> None:
        """Quit with ``q`` (an attached run is left alone); killed if it does not go."""
        try:
            self.press(b"q")
            self.proc.wait(10)  # psutil reaps its own child
        except (OSError, psutil.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)
        finally:
            os.close(self.fd)


def measure(rounds: int, seconds: float, warmup: float, tabs: list[str], start_steps: int) -> dict[str, Any]:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(["sleep", "infinity"])
        writer_args = [sys.executable, "-c", WRITER, str(ROOT), str(Path(tmp) / "run"), str(start_steps)]
        writer = None
        try:
            # the fixture first (it rewrites the files), then the writer, then its pid in run.json
            run_dir = live_run_dir(Path(tmp) / "run", trainer_pid=server.pid, server_pid=server.pid,
                                   steps=start_steps)
            writer = subprocess.Popen(writer_args)
            live_run_dir_pids(run_dir, trainer_pid=writer.pid, server_pid=server.pid)
            term = Terminal(run_dir)
            try:
                time.sleep(warmup + 3)  # start-up: imports, first batch of the run directory
                samples: dict[str, list[float]] = {tab: [] for tab in tabs}
                out_rates: dict[str, list[float]] = {tab: [] for tab in tabs}
                for rnd in range(rounds):
                    for tab in tabs:
                        term.press(TABS[tab])
                        time.sleep(warmup)  # the tab's first draw is not idle cost
                        c0, b0, t0 = term.cpu(), term.bytes, time.perf_counter()
                        time.sleep(seconds)
                        c1, b1, t1 = term.cpu(), term.bytes, time.perf_counter()
                        samples[tab].append(100 * (c1 - c0) / (t1 - t0))
                        out_rates[tab].append((b1 - b0) / (t1 - t0))
                        print(f"round {rnd + 1} {tab:<9} {samples[tab][-1]:5.2f}% of a core, "
                              f"{out_rates[tab][-1] / 1024:5.1f} KiB/s to the terminal", flush=True)
                steps = sum(1 for _ in open(RunDirectory(run_dir).metrics))
            finally:
                term.close()
        finally:
            for p in (writer, server):
                if p is not None:
                    p.kill()
                    p.wait()
    load_after = os.getloadavg()
    return {
        "python": sys.version.split()[0], "cpus": os.cpu_count(), "rounds": rounds, "seconds": seconds,
        "start_steps": start_steps,
        "load_before": load_before, "load_after": load_after, "steps_in_run": steps,
        "tabs": {tab: {"samples": samples[tab], "median": statistics.median(samples[tab]),
                       "min": min(samples[tab]), "max": max(samples[tab]),
                       "terminal_bytes_per_s": statistics.median(out_rates[tab])} for tab in tabs},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=20.0, help="measurement window per tab and round")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds after a tab switch before measuring")
    p.add_argument("--tabs", nargs="+", choices=list(TABS), default=list(TABS))
    p.add_argument("--start-steps", type=int, default=START_STEPS,
                   help="steps already in the run when the dashboard attaches (a long run: 10000)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()
    res = measure(args.rounds, args.seconds, args.warmup, args.tabs, args.start_steps)
    lb, la = res["load_before"], res["load_after"]
    print(f"\nvlmrl-tui --attach on a live run of {args.start_steps}+ steps ({COLS}x{ROWS}, 1 step + 5 log "
          f"lines/s, rollouts every 4 steps), {args.rounds} rounds x {args.seconds:.0f} s per tab, {res['cpus']} CPUs")
    print(f"load average before {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}, after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    for tab, t in res["tabs"].items():
        print(f"  {tab:<9} median {t['median']:5.2f}% of a core (range {t['min']:.2f}-{t['max']:.2f}), "
              f"{t['terminal_bytes_per_s'] / 1024:.1f} KiB/s to the terminal")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
