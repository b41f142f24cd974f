"""``vlmrl eval``: score models on an environment's held-out split through the serving path.

For each model asked for (``base``: the config's model; a ``checkpoints/<step>`` directory,
full or LoRA) the configured engine is started by the same supervisor as a training run,
on a free port, with an ``eval`` process in the trainer's place: ``vlmrl eval --server URL``,
which plays the held-out prompts (or a game's fixed eval seeds) greedily through the
rollout client and writes its :class:`~backend.evaluate.EvalResult`. Each model's server
and logs live in ``<run dir>/eval/<label>/`` (``RunDirectory.eval_run``); the scores of all models go to
``<run dir>/eval.json`` (``RunDirectory.eval_scores``) and are printed side by side. With ``--server URL`` the model an
already running server serves is scored instead, nothing is started.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from backend import net
from backend.config import VlmrlConfig
from backend.errors import ConfigError, VlmrlError
from backend.records import EXIT_OK, PROC_TRAINER
from backend.rundir import RunDirectory, write_json_atomic

EVAL_PROC = "eval"
BASE = "base"
EVAL_JSON_VERSION = 1


class EvalError(VlmrlError):
    """An evaluation could not run or finish (the message says which model and why)."""


@dataclass(frozen=True)
class Split:
    """Held-out items ``start .. start + count - 1`` (prompts, or a game's eval seeds)."""

    start: int
    count: int

    @property
    def label(self) -> str:
        return f"{self.start}-{self.start + self.count - 1}"


def parse_split(seeds: str | None, episodes: int | None, default: int) -> Split:
    """``--seeds A-B`` (eval items A to B, inclusive, 0-based) or ``--episodes N`` (the first N)."""
    if seeds is not None and episodes is not None:
        raise ConfigError(None, "--seeds", "give --seeds or --episodes, not both")
    if seeds is None:
        n = default if episodes is None else episodes
        if n < 1:
            raise ConfigError(None, "--episodes", f"must be at least 1, got {n}")
        return Split(0, n)
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", seeds)
    if not m:
        raise ConfigError(None, "--seeds", f"expected A-B or A (indices into the eval split), got {seeds!r}")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) is not None else a
    if b < a:
        raise ConfigError(None, "--seeds", f"the range {seeds!r} is empty (B < A)")
    return Split(a, b - a + 1)


def label_of(checkpoint: str) -> str:
    """A short, file-safe name for a model: ``base``, or ``<run>-<step>`` for ``.../<run>/checkpoints/<step>``."""
    if checkpoint == BASE:
        return BASE
    p = Path(checkpoint)
    parts = p.resolve().parts
    name = f"{parts[-3]}-{parts[-1]}" if len(parts) >= 3 and parts[-2] == "checkpoints" else p.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """The models' scores side by side: one column per model, one row per figure."""
    names = [str(r["name"]) for r in results]
    rows: list[tuple[str, list[str]]] = []

    def num(v: Any, fmt: str = ".3f") -> str:
        return "-" if not isinstance(v, (int, float)) or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    rows.append(("mean reward", [num(r.get("mean")) for r in results]))
    rows.append(("std", [num(r.get("std")) for r in results]))
    rows.append(("n", [str(r.get("n", "-")) for r in results]))
    if any(r.get("turns_mean") is not None for r in results):
        rows.append(("turns (mean)", [num(r.get("turns_mean"), ".1f") for r in results]))
    for key in sorted({k for r in results for k in r.get("parts", {})}):
        rows.append((f"part {key}", [num(r.get("parts", {}).get(key)) for r in results]))
    for key in sorted({k for r in results for k in r.get("achievements", {})}):
        rows.append((f"achievement {key}", [num(r.get("achievements", {}).get(key), ".2f") for r in results]))
    rows.append(("seconds", [num(r.get("seconds"), ".1f") for r in results]))
    first = max(len(k) for k, _ in rows)
    widths = [max(len(n), *(len(v[i]) for _, v in rows)) for i, n in enumerate(names)]
    lines = ["  ".join([" " * first, *(n.rjust(w) for n, w in zip(names, widths))])]
    for key, vals in rows:
        lines.append("  ".join([key.ljust(first), *(v.rjust(w) for v, w in zip(vals, widths))]))
    return "\n".join(lines)


def _score_on_server(cfg: VlmrlConfig, url: str, split: Split, label: str, out: Path) -> dict[str, Any]:
    from backend.evaluate import eval_client_main

    eval_client_main(cfg, url, count=split.count, start=split.start, label=label, output=out)
    return json.loads(out.read_text())


def _score_with_supervisor(cfg: VlmrlConfig, config_path: Path | None, checkpoint: str, split: Split,
                           rd: RunDirectory) -> dict[str, Any]:
    """Start the configured server for ``checkpoint`` under a supervisor, score it, stop it."""
    from backend.evaluate import eval_model_source
    from vlmrl_tui.headless import run_plan
    from vlmrl_tui.plan import build_plan

    label = label_of(checkpoint)
    home = rd.eval_run(label)
    if home.exists():
        shutil.rmtree(home)  # a previous eval of this model: its logs and result are redone
    source = eval_model_source(cfg, None if checkpoint == BASE else checkpoint, home / "merged")
    sub = cfg.model_copy(deep=True)
    sub.model = source
    sub.inference.port = net.free_port()
    sub.trainer.args.output_dir = str(home.parent)
    sub.trainer.args.run_name = label
    result = home / "result.json"
    plan = build_plan(sub, config_path)
    py = plan.process(PROC_TRAINER).argv[0]
    argv = (py, "-m", "vlmrl_tui.cli", "eval", str(plan.config_file), "--server", plan.server_url,
            "--seeds", split.label, "--label", checkpoint, "--output", str(result))
    spec = replace(plan.process(PROC_TRAINER), name=EVAL_PROC, argv=argv, restart_argv=None, restart="never",
                   max_restarts=0, log_path=RunDirectory(plan.run_dir).log(EVAL_PROC))
    plan = replace(plan, max_steps=0, processes=tuple(spec if p.name == PROC_TRAINER else p for p in plan.processes))
    code = run_plan(plan)
    if code != EXIT_OK or not result.is_file():
        raise EvalError(f"evaluating {checkpoint}: the eval run ended with exit code {code}; "
                        f"logs in {plan.run_dir / 'logs'}")
    return json.loads(result.read_text())


def eval_command(cfg: VlmrlConfig, config_path: Path | None, *, checkpoints: Sequence[str] = (),
                 episodes: int | None = None, seeds: str | None = None, server: str | None = None,
                 output: Path | None = None, label: str | None = None) -> int:
    """``vlmrl eval``; returns the exit code."""
    split = parse_split(seeds, episodes, cfg.trainer.args.eval_size)
    if server is not None:
        if checkpoints:
            raise ConfigError(None, "--checkpoint", "with --server the server's own model is scored; "
                              "drop --checkpoint, or drop --server to have vlmrl serve each checkpoint")
        if output is not None and label is not None:  # one model for a supervised `vlmrl eval`: its result only
            from backend.evaluate import eval_client_main

            return eval_client_main(cfg, server, count=split.count, start=split.start, label=label, output=output)
    for c in checkpoints:
        if c != BASE and not Path(c).is_dir():
            raise ConfigError(None, "--checkpoint", f"{c}: no such directory (give checkpoints/<step> or 'base')")
    rd = RunDirectory(cfg.run_dir().resolve())
    results: list[dict[str, Any]] = []
    if server is not None:
        results.append(_score_on_server(cfg, server, split, label or server, rd.eval_run("server") / "result.json"))
    else:
        for c in checkpoints or [BASE]:
            results.append(_score_with_supervisor(cfg, config_path, c, split, rd))
    out = output or rd.eval_scores
    doc = {"version": EVAL_JSON_VERSION, "env": cfg.env.id, "env_args": cfg.env.args, "split": split.label,
           "greedy": True, "created": time.time(), "models": results}
    write_json_atomic(out, doc, sort_keys=False)  # models and seeds keep their order
    print(format_table(results))
    print(f"wrote {out}", flush=True)
    return EXIT_OK


__all__ = ["EvalError", "Split", "eval_command", "format_table", "label_of", "parse_split"]
