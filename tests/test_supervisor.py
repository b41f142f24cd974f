"""The supervisor with real child processes (stand-in server and trainer scripts).

Each test runs a real plan whose children are small Python scripts: an HTTP server that
answers /health after a delay (or crashes, or ignores SIGTERM, or spawns grandchildren),
and a trainer that checks health, writes metrics and may crash. Every test ends with no
process of the run left (checked with psutil).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "fixtures"))

from standins import alive, all_pids, clean_env, make_plan, reports  # noqa: E402

from backend.rundir import read_json  # noqa: E402
from vlmrl_tui.control import send_command  # noqa: E402
from vlmrl_tui.plan import RunPlan  # noqa: E402
from vlmrl_tui.supervisor import Supervisor, SupervisorEvent  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def supervise(
    plan: RunPlan, driver: Callable[[Supervisor], Awaitable[Any]] | None = None, **kw: Any
) -> tuple[int, list[SupervisorEvent], dict[str, Any]]:
    """Run ``plan`` to its end (``driver`` acts on the run meanwhile); return code, events, run.json."""
    events: list[SupervisorEvent] = []

    async def main() -> int:
        sup = Supervisor(plan, on_event=events.append, **kw)
        task = asyncio.create_task(sup.run())
        if driver is not None:
            await driver(sup)
        return await task

    code = asyncio.run(main())
    info = read_json(plan.run_dir / "run.json")
    assert info is not None
    return code, events, info


async def until(cond: Callable[[], Any], timeout: float = 30.0) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met")


def proc_state(sup: Supervisor, name: str) -> dict[str, Any]:
    return sup.snapshot()["processes"][name]


def metrics_lines(plan: RunPlan) -> int:
    p = plan.run_dir / "metrics.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


def assert_nothing_left(root: Path) -> None:
    pids = all_pids(root)
    assert pids, "the stand-ins reported no pid"
    assert alive(pids) == [], f"processes left: {alive(pids)}"


def test_trainer_waits_for_server_health(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, server_args=["--ready-after", "1.0"])
    code, events, info = supervise(plan)
    assert code == 0
    server, trainer = info["processes"]["server"], info["processes"]["trainer"]
    (trainer_rep,) = reports(tmp_path / "trainer.jsonl")
    assert trainer_rep["health_at_start"] == 200  # the trainer never saw a server that was not ready
    assert trainer["started_at"] >= server["healthy_at"]
    assert server["healthy_at"] - server["started_at"] >= 1.0
    assert (server["status"], trainer["status"]) == ("stopped", "exited")
    assert trainer["exit_code"] == 0 and info["status"] == "completed" and info["exit_code"] == 0
    assert metrics_lines(plan) == 3
    order = [(e.proc, e.status) for e in events if e.kind == "state"]
    assert order.index(("server", "healthy")) < order.index(("trainer", "running"))
    assert_nothing_left(tmp_path)


def test_logs_keep_raw_lines_and_ansi(tmp_path: Path) -> None:
    plan = make_plan(tmp_path)
    code, _, _ = supervise(plan)
    assert code == 0
    log = (plan.run_dir / "logs" / "server.log").read_text()
    assert "\x1b[32mINFO\x1b[0m loading fake model" in log
    assert "trainer: done" in (plan.run_dir / "logs" / "trainer.log").read_text()
    # appended, never truncated: a second run in the same directory keeps the first one's lines
    supervise(make_plan(tmp_path))
    assert (plan.run_dir / "logs" / "server.log").read_text().count("loading fake model") == 2


def test_server_start_timeout_fails_with_the_last_log_lines(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, server_args=["--never-ready"], start_timeout=1.5)
    t0 = time.monotonic()
    code, events, info = supervise(plan)
    assert code == 1
    assert time.monotonic() - t0 < 1.5 + 2.0 + 3.0  # timeout + grace + slack
    server = info["processes"]["server"]
    assert server["status"] == "failed"
    assert "not healthy after 1.5 s" in server["reason"]
    assert info["failed_process"] == "server" and "not healthy after 1.5 s" in info["reason"]
    assert info["processes"]["trainer"]["status"] == "pending"  # never started
    assert reports(tmp_path / "trainer.jsonl") == []
    failure = [e for e in events if e.kind == "failure"]
    assert failure and any("loading fake model" in ln for ln in failure[0].log_tail)
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize("victim,other", [("server", "trainer"), ("trainer", "server")])
def test_kill9_of_either_child_stops_the_other(tmp_path: Path, victim: str, other: str) -> None:
    plan = make_plan(tmp_path, server_args=["--spawn-child"], trainer_args=["--steps", "400", "--step-time", "0.05"])

    killed: list[float] = []

    async def driver(sup: Supervisor) -> None:
        await until(lambda: metrics_lines(plan) >= 2)
        os.kill(proc_state(sup, victim)["pid"], signal.SIGKILL)
        killed.append(time.monotonic())

    code, _, info = supervise(plan, driver)
    print(f"kill -9 of the {victim}: the run ended {time.monotonic() - killed[0]:.2f} s later")
    assert code == 1
    dead, stopped = info["processes"][victim], info["processes"][other]
    assert dead["status"] == "killed" and dead["signal"] == "SIGKILL" and dead["exit_code"] == -9
    assert "not sent by vlmrl" in dead["reason"]
    assert stopped["status"] == "stopped" and f"{victim} failed" in stopped["reason"]
    assert info["status"] == "failed" and info["failed_process"] == victim
    assert_nothing_left(tmp_path)  # including the server's grandchild


def test_restart_policy_restarts_a_crashing_server_up_to_the_limit(tmp_path: Path) -> None:
    # never healthy, so the trainer never starts and only the server's policy is at work
    plan = make_plan(tmp_path, server_args=["--exit-after", "0.4", "--exit-code", "7", "--never-ready"],
                     server_restarts=2)
    code, events, info = supervise(plan)
    assert code == 1
    assert info["processes"]["trainer"]["status"] == "pending"
    assert len(reports(tmp_path / "server.jsonl")) == 3  # first start + 2 restarts, no more
    server = info["processes"]["server"]
    assert server["restarts"] == 2 and server["status"] == "failed" and server["exit_code"] == 7
    assert "after 2 restart(s)" in server["reason"]
    restarting = [e for e in events if e.kind == "state" and e.proc == "server" and e.status == "restarting"]
    assert len(restarting) == 2 and "restart 1 of 2" in restarting[0].message
    assert_nothing_left(tmp_path)


def test_a_server_that_crashes_once_is_restarted_and_the_run_completes(tmp_path: Path) -> None:
    marker = tmp_path / "crashed-once"
    plan = make_plan(tmp_path, server_args=["--exit-after", "0.2", "--crash-once", str(marker),
                                            "--ready-after", "0.5"], server_restarts=1)
    code, _, info = supervise(plan)
    assert code == 0
    assert len(reports(tmp_path / "server.jsonl")) == 2
    assert info["processes"]["server"]["restarts"] == 1
    assert info["processes"]["trainer"]["status"] == "exited"
    assert_nothing_left(tmp_path)


def test_a_crashing_trainer_is_restarted_with_resume_up_to_its_limit(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, trainer_args=["--steps", "5", "--crash-at", "2"], trainer_restarts=1)
    code, _, info = supervise(plan)
    assert code == 1
    starts = reports(tmp_path / "trainer.jsonl")
    assert [s["resume"] for s in starts] == [False, True]  # the restart continues from a checkpoint
    trainer = info["processes"]["trainer"]
    assert trainer["status"] == "failed" and trainer["restarts"] == 1 and trainer["exit_code"] == 3
    assert len(reports(tmp_path / "server.jsonl")) == 1  # the server was not restarted meanwhile
    assert info["processes"]["server"]["status"] == "stopped"
    assert_nothing_left(tmp_path)


def test_both_children_see_identical_nccl_variables(tmp_path: Path) -> None:
    shell = clean_env({"NCCL_DEBUG": "WARN"})  # inherited from the shell: both must see it too
    plan = make_plan(tmp_path, nccl={"P2P_DISABLE": 1, "IB_DISABLE": 1}, base_env=shell,
                     trainer_args=["--steps", "400", "--step-time", "0.05"])
    seen: dict[str, dict[str, str]] = {}

    def environ(pid: int) -> dict[str, str]:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(x.decode().split("=", 1) for x in raw if b"=" in x)

    async def driver(sup: Supervisor) -> None:
        await until(lambda: metrics_lines(plan) >= 1)
        for name in ("server", "trainer"):
            seen[name] = environ(proc_state(sup, name)["pid"])
        sup.request_stop()

    code, _, _ = supervise(plan, driver)
    assert code == 130

    def shared(env: dict[str, str]) -> dict[str, str]:
        keys = ("NCCL_", "MASTER_", "VLMRL_", "CUDA_DEVICE_ORDER", "no_proxy", "NO_PROXY")
        return {k: v for k, v in env.items() if k.startswith(keys)}

    s, t = shared(seen["server"]), shared(seen["trainer"])
    assert s == t
    assert s["NCCL_P2P_DISABLE"] == "1" and s["NCCL_IB_DISABLE"] == "1" and s["NCCL_DEBUG"] == "WARN"
    assert s["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # the sync port is in the resolved config, not the env
    assert len(s["VLMRL_RUN_TOKEN"]) >= 24
    # the children's own reports say the same
    rs, rt = reports(tmp_path / "server.jsonl")[0]["env"], reports(tmp_path / "trainer.jsonl")[0]["env"]
    assert shared(rs) == shared(rt) == s
    assert_nothing_left(tmp_path)


def test_stop_escalates_to_sigkill_after_the_grace_period(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, server_args=["--ignore-sigterm"], grace=1.0,
                     trainer_args=["--steps", "400", "--step-time", "0.05"])
    timing: dict[str, float] = {}

    async def driver(sup: Supervisor) -> None:
        await until(lambda: metrics_lines(plan) >= 1)
        timing["stop"] = time.monotonic()
        sup.request_stop()

    code, _, info = supervise(plan, driver)
    took = time.monotonic() - timing["stop"]
    assert code == 130
    # the grace period is waited out, then SIGKILL; the upper bound only says "not stuck"
    # (a loaded 2-core machine delays everything, so no tight wall-clock limit here)
    assert 1.0 <= took < 1.0 + 10.0, took
    server, trainer = info["processes"]["server"], info["processes"]["trainer"]
    assert server["status"] == "killed" and server["signal"] == "SIGKILL"  # ignored SIGTERM
    assert trainer["status"] == "stopped" and trainer["signal"] == "SIGTERM"
    assert info["status"] == "stopped" and info["exit_code"] == 130
    assert_nothing_left(tmp_path)


def test_kill_after_stop_does_not_wait_for_the_grace_period(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, server_args=["--ignore-sigterm"], grace=30.0,
                     trainer_args=["--steps", "400", "--step-time", "0.05", "--ignore-sigterm"])
    timing: dict[str, float] = {}

    async def driver(sup: Supervisor) -> None:
        await until(lambda: metrics_lines(plan) >= 1)
        timing["stop"] = time.monotonic()
        sup.request_stop()
        await asyncio.sleep(0.3)
        sup.kill()

    code, _, info = supervise(plan, driver)
    assert code == 130
    assert time.monotonic() - timing["stop"] < 15.0  # far below the 30 s grace it must not wait for
    assert {p["status"] for p in info["processes"].values()} == {"killed"}
    assert_nothing_left(tmp_path)


def test_grandchildren_outside_the_process_group_are_stopped(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, server_args=["--spawn-child", "--spawn-daemon"])
    code, _, _ = supervise(plan)
    assert code == 0
    (rec,) = reports(tmp_path / "server.jsonl")
    assert len(rec["children"]) == 2
    assert_nothing_left(tmp_path)


def test_a_cancelled_supervisor_leaves_no_process(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, server_args=["--spawn-child"], trainer_args=["--steps", "400", "--step-time", "0.05"])

    async def main() -> None:
        sup = Supervisor(plan)
        task = asyncio.create_task(sup.run())
        await until(lambda: metrics_lines(plan) >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    info = read_json(plan.run_dir / "run.json")
    assert info is not None and info["status"] == "failed"
    assert_nothing_left(tmp_path)


def test_control_socket_restart_status_and_stop(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, trainer_args=["--steps", "400", "--step-time", "0.05"])
    answers: dict[str, Any] = {}

    async def driver(sup: Supervisor) -> None:
        await until(lambda: metrics_lines(plan) >= 1)
        rd = plan.run_dir
        answers["status"] = await asyncio.to_thread(send_command, rd, "status")
        first = proc_state(sup, "server")["pid"]
        trainer_pid = proc_state(sup, "trainer")["pid"]
        answers["restart"] = await asyncio.to_thread(send_command, rd, "restart", "server")
        await until(lambda: proc_state(sup, "server")["status"] == "healthy" and proc_state(sup, "server")["pid"] != first)
        assert proc_state(sup, "trainer")["pid"] == trainer_pid  # the trainer kept running
        answers["bad"] = await asyncio.to_thread(send_command, rd, "restart", "nosuch")
        answers["stop"] = await asyncio.to_thread(send_command, rd, "stop")

    code, _, info = supervise(plan, driver)
    assert code == 130
    assert answers["status"]["ok"] and answers["status"]["run"]["processes"]["server"]["status"] == "healthy"
    assert answers["restart"] == {"ok": True} and answers["stop"] == {"ok": True}
    assert answers["bad"]["ok"] is False and "nosuch" in answers["bad"]["error"]
    assert len(reports(tmp_path / "server.jsonl")) == 2
    assert info["processes"]["server"]["restarts"] == 1
    assert info["control_socket"] is None and not (plan.run_dir / "supervisor.sock").exists()
    assert_nothing_left(tmp_path)


def test_stopping_the_trainer_alone_keeps_the_server_until_it_is_restarted(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, trainer_args=["--steps", "400", "--step-time", "0.05"])

    async def driver(sup: Supervisor) -> None:
        await until(lambda: metrics_lines(plan) >= 1)
        sup.stop_process("trainer")
        await until(lambda: proc_state(sup, "trainer")["status"] == "stopped")
        await asyncio.sleep(0.3)
        assert proc_state(sup, "server")["status"] == "healthy"
        sup.restart("trainer")
        await until(lambda: proc_state(sup, "trainer")["status"] == "running")
        await until(lambda: len(reports(tmp_path / "trainer.jsonl")) == 2)
        sup.request_stop()

    code, _, _ = supervise(plan, driver)
    assert code == 130
    starts = reports(tmp_path / "trainer.jsonl")
    assert len(starts) == 2 and starts[1]["resume"] is True  # a restarted trainer resumes
    assert_nothing_left(tmp_path)


def test_run_json_is_written_atomically_on_every_change(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, server_args=["--ready-after", "0.3"])
    seen: list[str] = []

    async def driver(sup: Supervisor) -> None:
        while True:
            info = read_json(plan.run_dir / "run.json")  # never a partial file
            if info is not None:
                key = f"{info['status']}:{info['processes']['server']['status']}:{info['processes']['trainer']['status']}"
                if not seen or seen[-1] != key:
                    seen.append(key)
                if info["status"] in ("completed", "failed", "stopped"):
                    return
            await asyncio.sleep(0.01)

    code, _, info = supervise(plan, driver)
    assert code == 0
    assert seen[0].startswith("starting:")
    assert "running:healthy:running" in seen
    assert seen[-1] == "completed:stopped:exited"
    assert info["supervisor_pid"] == os.getpid() and info["ports"]["server"] == plan.server_port
    assert [h["status"] for h in info["history"] if h["proc"] == "server"][:2] == ["starting", "healthy"]


def test_control_socket_path_is_short_enough_for_unix_sockets(tmp_path: Path) -> None:
    from vlmrl_tui.control import socket_path

    assert socket_path(tmp_path) == tmp_path.resolve() / "supervisor.sock"
    deep = tmp_path / ("x" * 120)
    fallback = socket_path(deep)
    assert len(str(fallback)) < 100 and fallback.name.startswith("vlmrl-") and fallback == socket_path(deep)


def test_a_long_run_dir_still_gets_a_control_socket(tmp_path: Path) -> None:
    root = tmp_path / ("long-" * 15)
    root.mkdir()
    plan = make_plan(root, trainer_args=["--steps", "400", "--step-time", "0.05"])
    answers: dict[str, Any] = {}

    async def driver(sup: Supervisor) -> None:
        await until(lambda: metrics_lines(plan) >= 1)
        info = read_json(plan.run_dir / "run.json") or {}
        answers["socket"] = info.get("control_socket")
        answers["status"] = await asyncio.to_thread(send_command, plan.run_dir, "status")
        await asyncio.to_thread(send_command, plan.run_dir, "kill")

    code, _, _ = supervise(plan, driver)
    assert code == 130
    assert answers["status"]["ok"] and not str(answers["socket"]).startswith(str(root))
    assert not Path(answers["socket"]).exists()
    assert_nothing_left(root)


def test_send_command_without_a_supervisor_says_so(tmp_path: Path) -> None:
    from backend.errors import VlmrlError

    with pytest.raises(VlmrlError, match="no supervisor is running"):
        send_command(tmp_path, "status")
    with pytest.raises(VlmrlError, match="unknown command"):
        send_command(tmp_path, "explode")


def test_a_command_that_cannot_start_fails_the_run_clearly(tmp_path: Path) -> None:
    plan = make_plan(tmp_path, server_restarts=2).replace_process("server", argv=(str(tmp_path / "no-such-binary"),))
    code, events, info = supervise(plan)
    assert code == 1
    server = info["processes"]["server"]
    assert server["status"] == "failed" and "cannot start" in server["reason"] and server["restarts"] == 0
    assert "cannot start" in (plan.run_dir / "logs" / "server.log").read_text()
    assert info["processes"]["trainer"]["status"] == "pending"
