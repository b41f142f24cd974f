"""A fixed, deterministic run directory for the TUI tests, snapshots and benchmark.

Written with the same file names and records the supervisor and trainer write
(``backend.records``, ``backend.rundir``): run.json, logs/<proc>.log with ANSI colours and one traceback,
metrics.jsonl, rollouts.jsonl and rollouts/<step>/<index>_0.png. Nothing is random and
every time stamp is fixed, so two builds give byte-identical files. :func:`add_episode`
appends a multi-turn (Crafter-like) episode record with one frame per turn, :func:`add_step`
a step of rollouts with chosen rewards and completions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from PIL import Image

from backend.records import ProcessInfo, RolloutRecord, RunInfo, TurnRecord
from backend.rundir import RunDirectory, write_json_atomic

if TYPE_CHECKING:
    from textual.app import App
    from textual.pilot import Pilot

T0 = 1_750_000_000.0  # fixed start time (2025-06-15)
COLOURS = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
    "yellow": (235, 215, 40), "purple": (140, 50, 170),
}
NAMES = list(COLOURS)
GREEN, RESET, YELLOW, RED, BOLD = "\x1b[32m", "\x1b[0m", "\x1b[33m", "\x1b[31m", "\x1b[1m"
CONFIG = """model = "builtin:tiny-qwen3-vl"

[env]
id = "colors"

[env.args]
num_colors = 5
image_size = 64

[inference]
engine = "hf"
port = 8000

[trainer.args]
run_name = "fixture"
max_steps = {max_steps}
batch_size = 8
micro_batch_size = 8
rollouts_per_step = 4
"""


def _image(colour: tuple[int, int, int], variant: int, size: int = 64) -> Image.Image:
    img = Image.new("RGB", (size, size), colour)
    if variant % 2:  # deterministic "noise": a checker of slightly darker cells
        px = img.load()
        for y in range(size):
            for x in range(size):
                if (x // 8 + y // 8) % 2:
                    px[x, y] = tuple(max(0, c - 35) for c in colour)
    return img


def run_json(status: str = "completed", server_pid: int = 4243, trainer_pid: int = 4250,
             max_steps: int = 40) -> dict:
    """run.json of a finished run: server stopped, trainer exited 0 after one restart."""
    return RunInfo(
        name="fixture", status=status, supervisor_pid=4242, started_at=T0, ended_at=T0 + 130.0,
        server_url="http://127.0.0.1:8000", max_steps=max_steps,
        processes={
            "server": ProcessInfo(name="server", argv=[], log="", status="stopped", pid=server_pid,
                                  started_at=T0 + 1.0, ended_at=T0 + 130.0, exit_code=0,
                                  health_url="http://127.0.0.1:8000/health"),
            "trainer": ProcessInfo(name="trainer", argv=[], log="", status="exited", pid=trainer_pid,
                                   started_at=T0 + 31.0, ended_at=T0 + 129.0, exit_code=0, restarts=1),
        },
    ).to_json()


def server_log(n: int) -> list[str]:
    out = [
        f"{GREEN}INFO{RESET}:     Started server process [4243]",
        f"{GREEN}INFO{RESET}:     Uvicorn running on {BOLD}http://127.0.0.1:8000{RESET}",
    ]
    for i in range(n):
        out.append(
            f'{GREEN}INFO{RESET}:     127.0.0.1:{41000 + i % 50} - "POST /v1/chat/completions HTTP/1.1" '
            f"{GREEN}200 OK{RESET}"
        )
        if i % 40 == 39:
            out.append(f"{YELLOW}WARNING{RESET}:  batch queue at {i % 7 + 3} requests (weight sync in progress)")
    return out


def trainer_log(steps: int, max_steps: int) -> list[str]:
    out = ["loading model builtin:tiny-qwen3-vl", "waiting for server http://127.0.0.1:8000/health ... ok"]
    crash = steps // 3
    for step in range(1, steps + 1):
        r = _reward(step, max_steps)
        out.append(f"step {step:>3}/{max_steps} reward {r:.3f} loss {_loss(step):.4f} kl 0.0000 "
                   f"tokens/s {_tps(step):.0f}")
        if step == crash:
            out += [
                f"{RED}Traceback (most recent call last):{RESET}",
                '  File "backend/train.py", line 120, in train_main',
                "    batch = client.rollouts(step)",
                '  File "backend/rollout.py", line 88, in rollouts',
                "    raise ConnectionError(\"server closed the connection\")",
                f"{RED}{BOLD}ConnectionError: server closed the connection{RESET}",
                "trainer restarting from checkpoint (attempt 1)",
            ]
    out.append(f"{GREEN}done{RESET}: {steps} steps, final reward {_reward(steps, max_steps):.3f}")
    return out


def _reward(step: int, max_steps: int) -> float:
    return round(0.2 + 0.75 * (1 - math.exp(-step / (max_steps / 4))) + 0.04 * math.sin(step), 4)


def _loss(step: int) -> float:
    return round(0.05 * math.cos(step / 3) - 0.002 * step, 5)


def _tps(step: int) -> float:
    return 900.0 + 60 * math.sin(step / 2)


def metrics(steps: int, max_steps: int) -> list[dict]:
    out = []
    for step in range(1, steps + 1):
        r = _reward(step, max_steps)
        out.append({
            "step": step, "reward_mean": r, "reward_std": round(0.35 * (1 - r) + 0.05, 4),
            "loss": _loss(step), "ir": round(1.0 + 0.01 * math.sin(step), 5),
            "ir_min": round(0.93 + 0.01 * math.cos(step), 5), "ir_max": round(1.07 + 0.01 * math.sin(step / 2), 5),
            "entropy": round(1.6 * math.exp(-step / 30) + 0.1, 5), "kl": 0.0,
            "mismatch_kl": round(1e-4 * (1 + math.sin(step)), 7), "clip_frac": round(0.02 + 0.01 * math.sin(step), 4),
            "masked_frac": 0.0, "grad_norm": round(0.8 + 0.3 * math.cos(step), 4), "lr": 3e-4,
            "tokens_per_s": round(_tps(step), 2), "rollout_s": 0.9, "train_s": 0.6, "sync_s": 0.12,
            "batch_s": 0.05, "forward_backward_s": 0.5, "optimizer_s": 0.04, "write_s": 0.08,
            "step_s": 1.7, "num_rollouts": 8, "time": T0 + 31.0 + 1.7 * step,
        })
    return out


def rollouts(rd: RunDirectory, rollout_steps: list[int], max_steps: int) -> list[dict]:
    out = []
    for step in rollout_steps:
        folder = rd.rollout_images(step)
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(8):
            group, k = divmod(index, 4)
            truth = NAMES[(step + group) % len(NAMES)]
            good = (step * 7 + index * 3) % 10 < _reward(step, max_steps) * 8
            answer = truth if good else NAMES[(step + group + 1 + k) % len(NAMES)]
            name = f"{index}_0.png"
            _image(COLOURS[truth], step + group).save(folder / name, optimize=False)
            out.append({
                "step": step, "index": index, "group": group, "example_id": f"colors-{step:04d}-{group}",
                "prompt": "What colour is this image? Answer with one word.",
                "completion": answer, "reward": 1.0 if good else 0.0,
                "reward_parts": {"correct": 1.0 if good else 0.0, "format": 1.0},
                "advantage": None, "images": [f"rollouts/{step}/{name}"],
            })
        group_rewards: dict[int, list[float]] = {}
        for rec in out[-8:]:
            group_rewards.setdefault(rec["group"], []).append(rec["reward"])
        for rec in out[-8:]:
            rs = group_rewards[rec["group"]]
            mean = sum(rs) / len(rs)
            std = math.sqrt(sum((x - mean) ** 2 for x in rs) / len(rs))
            rec["advantage"] = round((rec["reward"] - mean) / (std + 1e-4), 4)
    return out


def make_run_dir(path: Path, steps: int = 40, max_steps: int = 40, server_lines: int = 300,
                 rollout_steps: list[int] | None = None, status: str = "completed") -> Path:
    """Write the fixture run directory at ``path`` and return it."""
    rd = RunDirectory(path).create()
    rd.config.write_text(CONFIG.format(max_steps=max_steps), encoding="utf-8")
    write_json_atomic(rd.run_json, run_json(status, max_steps=max_steps))
    rd.log("server").write_text("\n".join(server_log(server_lines)) + "\n", encoding="utf-8")
    rd.log("trainer").write_text("\n".join(trainer_log(steps, max_steps)) + "\n", encoding="utf-8")
    with open(rd.metrics, "w", encoding="utf-8") as f:
        for rec in metrics(steps, max_steps):
            f.write(json.dumps(rec) + "\n")
    steps_with_rollouts = rollout_steps if rollout_steps is not None else list(range(4, steps + 1, 4))
    with open(rd.rollouts, "w", encoding="utf-8") as f:
        for rec in rollouts(rd, steps_with_rollouts, max_steps):
            f.write(json.dumps(rec) + "\n")
    return rd.path


# An episode of a Crafter-like game: (reply, action, parsed, parts, unlocked, health, frame colour).
EPISODE_TURNS = (
    ("move_left", "move_left", "exact", {"achievements": 0.0, "format": 0.0}, [], 9, (60, 150, 70)),
    ("I face a tree, so: do", "do", "fuzzy", {"achievements": 1.0, "format": 0.0}, ["collect_wood"], 9,
     (120, 80, 40)),
    ("jump over it", "noop", "none", {"achievements": 0.0, "format": -0.1}, [], 8, (70, 90, 200)),
    ("place_table", "place_table", "exact", {"achievements": 1.0, "format": 0.0}, ["place_table"], 8,
     (200, 200, 60)),
    ("sleep", "sleep", "exact", {"achievements": 0.0, "format": 0.0}, [], 8, (150, 60, 160)),
)
EPISODE_ACHIEVEMENTS = ("collect_wood", "place_table", "collect_stone", "defeat_zombie")


def episode_record(run_dir: Path, step: int, index: int, group: int, seed: int = 7,
                   end_reason: str = "done") -> RolloutRecord:
    """A finished episode of :data:`EPISODE_TURNS`, its frames written as real PNGs
    (``rollouts/<step>/crafter-<seed>-e<index>-<k>.png``, a distinct colour per turn), named
    as the rollout writer names them."""
    rd = RunDirectory(run_dir)
    folder = rd.rollout_images(step)
    folder.mkdir(parents=True, exist_ok=True)
    example_id = f"crafter-{seed}"
    rel = folder.relative_to(rd.path).as_posix()
    turns: list[TurnRecord] = []
    for k, (reply, action, parsed, parts, unlocked, health, colour) in enumerate(EPISODE_TURNS):
        name = f"{example_id}-e{index}-{k}.png"
        img = _image(colour, k, size=48)
        img.paste((250, 250, 250), (20, 20, 28, 28))  # the player
        img.save(folder / name, optimize=False)
        turns.append(TurnRecord(
            completion=reply, reward=round(sum(parts.values()), 4), reward_parts=dict(parts),
            info={"action": action, "parsed": parsed, "unlocked": list(unlocked), "health": health},
            images=[f"{rel}/{name}"], finish_reason="stop", prompt_tokens=300 + 80 * k,
            completion_tokens=len(reply.split()) + 1,
        ))
    parts_sum: dict[str, float] = {}
    for t in turns:
        for key, v in t.reward_parts.items():
            parts_sum[key] = round(parts_sum.get(key, 0.0) + v, 4)
    reward = round(sum(t.reward for t in turns), 4)
    got = {a for t in turns for a in t.info["unlocked"]}
    summary = {"turns": float(len(turns)), "reward": reward, "achievements": float(len(got))}
    summary.update({f"achievement/{a}": float(a in got) for a in EPISODE_ACHIEVEMENTS})
    return RolloutRecord(
        step=step, index=index, group=group, example_id=example_id,
        prompt="You play Crafter, a 2D survival game seen from above. Reply with one action name. <image>",
        completion=turns[-1].completion, reward=reward, reward_parts=parts_sum, advantage=0.75,
        finish_reason="stop", weight_version=step - 1, images=[p for t in turns for p in t.images],
        turns=turns, end_reason=end_reason, summary=summary,
    )


def add_episode(run_dir: Path, step: int, index: int, group: int, **kw: object) -> RolloutRecord:
    """Append :func:`episode_record` to the run's rollouts.jsonl and return it."""
    rec = episode_record(run_dir, step, index, group, **kw)  # type: ignore[arg-type]
    with open(RunDirectory(run_dir).rollouts, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec.to_json()) + "\n")
    return rec


def add_step(run_dir: Path, step: int, groups: "list[list[tuple[float, str]]]") -> list[RolloutRecord]:
    """Append a step whose group ``g`` has one rollout per (reward, completion) in
    ``groups[g]`` (indices run on across groups), each with its own PNG; reward parts:
    ``correct`` = the reward, ``format`` = 1 for a one-line completion of letters and
    spaces, else 0. Returns the records written."""
    rd = RunDirectory(run_dir)
    folder = rd.rollout_images(step)
    folder.mkdir(parents=True, exist_ok=True)
    out: list[RolloutRecord] = []
    for group, rollouts in enumerate(groups):
        for reward, completion in rollouts:
            index = len(out)
            _image(COLOURS[NAMES[(step + group) % len(NAMES)]], index).save(folder / f"{index}_0.png", optimize=False)
            well_formed = bool(completion) and all(c.isalpha() or c == " " for c in completion)
            out.append(RolloutRecord(
                step=step, index=index, group=group, example_id=f"colors-{step:04d}-{group}",
                prompt="What colour is this image? Answer with one word.", completion=completion, reward=reward,
                reward_parts={"correct": reward, "format": 1.0 if well_formed else 0.0}, advantage=0.0,
                images=[f"{folder.relative_to(rd.path).as_posix()}/{index}_0.png"],
            ))
    with open(rd.rollouts, "a", encoding="utf-8") as f:
        for rec in out:
            f.write(json.dumps(rec.to_json()) + "\n")
    return out


class FakeNvmlError(Exception):
    """What the fake raises for an unsupported query (the real one raises NVMLError_*)."""


class FakePynvml:
    """The slice of ``pynvml`` that :mod:`vlmrl_tui.gpu` calls, answering for two GPUs.

    ``procs`` maps a GPU index to (pid, bytes) pairs. Graphics processes are "not
    supported" (raises), as on many data-centre GPUs: the wrapper must turn that into N/A.
    """

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, procs: dict[int, list[tuple[int, int]]] | None = None) -> None:
        self.procs = procs or {}
        self.gpus = [
            {"name": "NVIDIA H100 80GB HBM3", "used": 31 * 2**30, "total": 80 * 2**30, "util": 87, "mem": 40,
             "temp": 64, "power": 412_000, "limit": 700_000},
            {"name": "NVIDIA H100 80GB HBM3", "used": 9 * 2**30, "total": 80 * 2**30, "util": 12, "mem": 3,
             "temp": 41, "power": 118_000, "limit": 700_000},
        ]
        self.calls = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        if not 0 <= i < len(self.gpus):
            raise FakeNvmlError("invalid argument")
        return i

    def nvmlDeviceGetName(self, h: int) -> str:
        return self.gpus[h]["name"]

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return f"GPU-0000000{h}-fake"

    def nvmlDeviceGetMemoryInfo(self, h: int):
        from types import SimpleNamespace

        g = self.gpus[h]
        return SimpleNamespace(used=g["used"], total=g["total"], free=g["total"] - g["used"])

    def nvmlDeviceGetUtilizationRates(self, h: int):
        from types import SimpleNamespace

        self.calls += 1
        return SimpleNamespace(gpu=self.gpus[h]["util"], memory=self.gpus[h]["mem"])

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return self.gpus[h]["temp"]

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self.gpus[h]["power"]

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return self.gpus[h]["limit"]

    def nvmlDeviceGetComputeRunningProcesses(self, h: int):
        from types import SimpleNamespace

        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in self.procs.get(h, [])]

    def nvmlDeviceGetGraphicsRunningProcesses(self, h: int):
        raise FakeNvmlError("Not Supported")

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return 12040

    def nvmlSystemGetNVMLVersion(self) -> str:
        return "12.550.54.15"


def screen_text(app: "App[object]") -> str:
    """The current screen as plain text, one line per terminal row (as the user sees it)."""
    import io

    from rich.console import Console

    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


async def wait_for(pilot: "Pilot[object]", cond: "Callable[[], object]", timeout: float = 10.0,
                   what: str = "") -> None:
    """Let the app run until ``cond()`` is true (AssertionError after ``timeout`` s)."""
    for _ in range(int(timeout / 0.05)):
        if cond():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"timed out waiting for {what or cond}")
