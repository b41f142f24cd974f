"""``vlmrl-tui``: launch a run and watch it, attach to one, or pick one from a list.

    vlmrl-tui CONFIG.toml [key=value ...]   start `vlmrl run CONFIG` detached, then watch it
    vlmrl-tui --attach RUN_DIR              watch a run started elsewhere (live or finished)
    vlmrl-tui --attach RUN_A RUN_B ...      the same for RUN_A, its metrics tab comparing all of them
    vlmrl-tui                               list recent runs under the output dir (space marks
                                            runs to compare, Enter opens them)

A launched run is the very same ``vlmrl run`` a shell would start (same supervisor, same
process handling), in its own session with its output in ``logs/supervisor.log``; the
dashboard only reads the run directory and talks to the supervisor's control socket, so
closing it can leave the run going headless. With several runs, the first is the one whose
processes, logs and rollouts are shown; the metrics tab overlays all of their curves (``c``
switches between the comparison and the first run's own metrics).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from backend.errors import VlmrlError
from vlmrl_tui.launch import LaunchedRun, launch_run

if TYPE_CHECKING:
    from vlmrl_tui.app import VlmrlApp


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmrl-tui",
        description="Dashboard for vlmrl runs: launch one from CONFIG, --attach to one (or compare several), "
                    "or pick one.",
    )
    p.add_argument("config", nargs="?", type=Path, help="config TOML to launch (omit to attach or pick)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.args.max_steps=5")
    p.add_argument("--attach", type=Path, nargs="+", metavar="RUN_DIR",
                   help="watch a run started elsewhere; with several, compare their metrics (the first "
                        "is the one whose processes, logs and rollouts are shown)")
    p.add_argument("--output-dir", type=Path, default=None, help="parent directory of runs (default: runs)")
    p.add_argument("--name", default=None, help="run name (directory under the output dir)")
    p.add_argument("--resume", action="store_true", help="the trainer continues from the latest checkpoint")
    p.add_argument("--scrollback", type=int, default=10_000, help="log lines kept per process (default 10000)")
    p.add_argument("--no-gpu", action="store_true", help="do not sample GPUs")
    return p


def attach_dirs(paths: list[Path]) -> list[Path]:
    """``--attach``'s run directories, resolved, each once, in the order given; a
    :class:`VlmrlError` names the first one that is not a directory."""
    out: list[Path] = []
    for path in paths:
        if not path.is_dir():
            what = "not a directory" if path.exists() else "no such run directory"
            raise VlmrlError(f"{path}: {what}")
        if path.resolve() not in out:
            out.append(path.resolve())
    return out


def build_app(args: argparse.Namespace, run_dirs: list[Path], launched: LaunchedRun | None) -> "VlmrlApp":
    """The dashboard for the parsed arguments: ``run_dirs[0]`` attached (none: the picker), the
    rest compared with it."""
    from vlmrl_tui.app import VlmrlApp

    return VlmrlApp(
        run_dirs[0] if run_dirs else None,
        compare=run_dirs[1:],
        output_dir=args.output_dir or Path("runs"),
        launched=launched,
        scrollback=args.scrollback,
        gpu=not args.no_gpu,
        own_process=True,
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.config is not None and "=" in str(args.config) and not args.config.exists():
        parser.error(f"{args.config}: a config file comes before key=value overrides")
    if args.attach is not None and (args.config is not None or args.overrides):
        parser.error("--attach watches an existing run: give no CONFIG or overrides with it")
    if args.scrollback < 1:
        parser.error("--scrollback must be at least 1")

    launched: LaunchedRun | None = None
    run_dirs: list[Path] = []
    try:
        if args.config is not None:
            launched = launch_run(args.config, list(args.overrides), args.output_dir, args.name, args.resume)
            run_dirs = [launched.run_dir]
        elif args.attach is not None:
            run_dirs = attach_dirs(args.attach)
    except VlmrlError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))

    app = build_app(args, run_dirs, launched)
    result = None
    try:
        result = app.run()
    finally:
        if launched is not None and launched.process.poll() is None and result != "stopped":
            print(f"The run keeps going headless (supervisor pid {launched.process.pid}).\n"
                  f"  watch it:  vlmrl-tui --attach {launched.run_dir}\n"
                  f"  or:        vlmrl attach {launched.run_dir}")
        elif result == "stopped":
            print(f"Run stopped: {launched.run_dir if launched else run_dirs[0]}")
    sys.exit(app.return_code or 0)


if __name__ == "__main__":
    main()
