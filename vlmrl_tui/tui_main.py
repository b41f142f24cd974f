"""``vlmrl-tui``: launch a run and watch it, attach to one, or pick one from a list.

    vlmrl-tui CONFIG.toml [key=value ...]   start `vlmrl run CONFIG` detached, then watch it
    vlmrl-tui --attach RUN_DIR              watch a run started elsewhere (live or finished)
    vlmrl-tui                               list recent runs under the output dir

A launched run is the very same ``vlmrl run`` a shell would start (same supervisor, same
process handling), in its own session with its output in ``logs/supervisor.log``; the
dashboard only reads the run directory and talks to the supervisor's control socket, so
closing it can leave the run going headless.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from backend.errors import VlmrlError
from vlmrl_tui.launch import LaunchedRun, launch_run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlmrl-tui",
        description="Dashboard for vlmrl runs: launch one from CONFIG, --attach to one, or pick one.",
    )
    p.add_argument("config", nargs="?", type=Path, help="config TOML to launch (omit to attach or pick)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.args.max_steps=5")
    p.add_argument("--attach", type=Path, metavar="RUN_DIR", help="watch a run started elsewhere")
    p.add_argument("--output-dir", type=Path, default=None, help="parent directory of runs (default: runs)")
    p.add_argument("--name", default=None, help="run name (directory under the output dir)")
    p.add_argument("--resume", action="store_true", help="the trainer continues from the latest checkpoint")
    p.add_argument("--scrollback", type=int, default=10_000, help="log lines kept per process (default 10000)")
    p.add_argument("--no-gpu", action="store_true", help="do not sample GPUs")
    return p


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
    run_dir: Path | None = None
    try:
        if args.config is not None:
            launched = launch_run(args.config, list(args.overrides), args.output_dir, args.name, args.resume)
            run_dir = launched.run_dir
        elif args.attach is not None:
            if not args.attach.is_dir():
                raise VlmrlError(f"{args.attach}: no such run directory")
            run_dir = args.attach.resolve()
    except VlmrlError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 1))

    from vlmrl_tui.app import VlmrlApp

    app = VlmrlApp(
        run_dir,
        output_dir=args.output_dir or Path("runs"),
        launched=launched,
        scrollback=args.scrollback,
        gpu=not args.no_gpu,
        handle_signals=True,
    )
    result = None
    try:
        result = app.run()
    finally:
        if launched is not None and launched.process.poll() is None and result != "stopped":
            print(f"The run keeps going headless (supervisor pid {launched.process.pid}).\n"
                  f"  watch it:  vlmrl-tui --attach {launched.run_dir}\n"
                  f"  or:        vlmrl attach {launched.run_dir}")
        elif result == "stopped":
            print(f"Run stopped: {launched.run_dir if launched else run_dir}")
    sys.exit(app.return_code or 0)


if __name__ == "__main__":
    main()
