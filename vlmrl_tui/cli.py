"""The ``vlmrl`` command line (typer). Never imports Textual.

Each command parses its arguments, loads the config and hands over to the module that owns
the work; heavy imports (torch, transformers) happen inside those modules, so ``--help``
and ``doctor`` start fast. Every expected error (:class:`~backend.errors.VlmrlError`:
a bad config is exit code 2) becomes one line on stderr in :func:`main`, never a
traceback.
"""

from __future__ import annotations

import errno
import sys
from pathlib import Path
from typing import List, Optional

import typer

from backend.errors import VlmrlError

app = typer.Typer(
    name="vlmrl",
    help="Reinforcement learning for vision-language models: run, serve, train, check.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate and print config files.", no_args_is_help=True)
model_app = typer.Typer(help="Build and inspect models.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(model_app, name="model")

OverridesArg = typer.Argument(None, help="key=value overrides, e.g. trainer.args.max_steps=5")


def _load(path: Path, overrides: list[str] | None):
    from backend.config import load_config

    return load_config(path, overrides or [])


@config_app.command("check")
def config_check(
    config: Path = typer.Argument(..., help="config TOML file"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Validate CONFIG: its syntax, keys and values, and what it names (the model, the
    environment); print the resolved config (exit 2 on a problem). The machine's checks
    (GPUs, ports, NCCL, vLLM, memory) are `vlmrl doctor CONFIG`'s."""
    from backend.config import config_to_toml
    from vlmrl_tui.doctor import FAIL, config_checks

    cfg = _load(config, overrides)
    problems = [(key, r) for key, r in config_checks(cfg) if r.status == FAIL]
    for key, r in problems:
        typer.echo(f"error: {config}: {key}: {r.message}" + (f" ({r.fix})" if r.fix else ""), err=True)
    if problems:
        raise typer.Exit(2)
    typer.echo(f"{config}: ok (the machine's checks: vlmrl doctor {config})")
    typer.echo(config_to_toml(cfg), nl=False)


@config_app.command("show")
def config_show(
    config: Path = typer.Argument(..., help="config TOML file"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Print CONFIG as TOML with every default filled."""
    from backend.config import config_to_toml

    typer.echo(config_to_toml(_load(config, overrides)), nl=False)


@model_app.command("build-tiny")
def model_build_tiny(
    out_dir: Path = typer.Argument(..., help="directory to write the model into"),
    family: str = typer.Option("qwen3-vl", help="qwen3-vl | qwen2.5-vl | qwen2-vl | llava"),
    seed: int = typer.Option(0, help="seed for weights and warm-up"),
    warmup: bool = typer.Option(True, help="format-only warm-up of the language model"),
    size: str = typer.Option("tiny", help="tiny (a few hundred thousand parameters) | small (~30M, qwen3-vl)"),
) -> None:
    """Build a tiny (or small) VLM offline (real HF model directory, tokenizer trained locally)."""
    from backend.tiny import build_tiny

    path = build_tiny(family, out_dir, seed=seed, warmup=warmup, progress=True, size=size)
    typer.echo(f"wrote {path}")


@app.command("serve")
def serve(
    config: Path = typer.Argument(..., help="config TOML file"),
    overrides: Optional[List[str]] = OverridesArg,
) -> None:
    """Run the inference server of CONFIG alone (what the supervisor spawns)."""
    from backend.serve import serve_main

    cfg = _load(config, overrides)
    code = serve_main(cfg)
    raise typer.Exit(code)


@app.command("train")
def train(
    config: Path = typer.Argument(..., help="config TOML file"),
    overrides: Optional[List[str]] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint"),
) -> None:
    """Run the trainer of CONFIG alone against a running server (what the supervisor spawns)."""
    from backend.train import train_main

    cfg = _load(config, overrides)
    code = train_main(cfg, resume=resume)
    raise typer.Exit(code)


@app.command("eval")
def evaluate(
    config: Path = typer.Argument(..., help="config TOML file"),
    overrides: Optional[List[str]] = OverridesArg,
    checkpoint: Optional[List[str]] = typer.Option(
        None, "--checkpoint", help="a checkpoints/<step> dir (full or LoRA), or 'base' for the config's model; "
        "repeat to compare models side by side (default: base)"),
    episodes: Optional[int] = typer.Option(None, "--episodes", "-n",
                                           help="held-out prompts or episodes to score (default: eval_size)"),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="held-out items A-B (0-based, inclusive) instead"),
    server: Optional[str] = typer.Option(None, "--server", help="score the model an already running server serves"),
    output: Optional[Path] = typer.Option(None, "--output", help="where to write the scores (default: "
                                          "<run dir>/eval.json)"),
    label: Optional[str] = typer.Option(None, "--label", hidden=True, help="the model's name in the result"),
) -> None:
    """Score models greedily on the environment's held-out split through the configured engine."""
    from vlmrl_tui.evaluation import eval_command

    cfg = _load(config, overrides)
    code = eval_command(cfg, config, checkpoints=checkpoint or [], episodes=episodes, seeds=seeds, server=server,
                        output=output, label=label)
    raise typer.Exit(code)


@app.command("run")
def run(
    config: Path = typer.Argument(..., help="config TOML file"),
    overrides: Optional[List[str]] = OverridesArg,
    name: Optional[str] = typer.Option(None, help="run name (directory under output dir)"),
    output_dir: Optional[Path] = typer.Option(None, help="parent directory of runs"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (with --slurm: the sbatch script) and exit"),
    resume: bool = typer.Option(False, "--resume", help="trainer continues from the latest checkpoint"),
    slurm: bool = typer.Option(False, "--slurm", help="submit the run as a SLURM job ([slurm] table) and watch it"),
    slurm_job: bool = typer.Option(False, "--slurm-job", hidden=True, help="inside the job: place processes with srun"),
) -> None:
    """Launch server and trainer under one supervisor, headless; progress on stdout."""
    from backend.config import location_overrides

    all_overrides = [*(overrides or []), *location_overrides(name, output_dir)]
    cfg = _load(config, all_overrides)
    if slurm_job:
        from vlmrl_tui.headless import run_headless
        from vlmrl_tui.slurm import inside_placement

        code = run_headless(cfg, config_path=config, resume=resume, placement=inside_placement(cfg))
    elif slurm or cfg.run.launcher == "slurm":
        from vlmrl_tui.slurm import submit_run

        code = submit_run(cfg, config, all_overrides, dry_run=dry_run, resume=resume)
    else:
        from vlmrl_tui.headless import run_headless

        code = run_headless(cfg, config_path=config, dry_run=dry_run, resume=resume)
    raise typer.Exit(code)


@app.command("attach")
def attach(run_dir: Path = typer.Argument(..., help="a run directory, live or finished")) -> None:
    """Print the headless view of a run started elsewhere."""
    from vlmrl_tui.headless import attach_headless

    code = attach_headless(run_dir)
    raise typer.Exit(code)


@app.command("doctor")
def doctor(
    config: Optional[Path] = typer.Argument(None, help="config TOML file (optional)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Preflight: versions, GPUs, ports, NCCL variables, /dev/shm, disk, model."""
    from vlmrl_tui.doctor import doctor_main

    cfg = _load(config, []) if config is not None else None
    code = doctor_main(cfg, as_json=as_json)
    raise typer.Exit(code)


#: errors of the file system under the run directory: one line, not a traceback
_STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def main() -> None:
    """Console-script entry point: expected errors become one line and their exit code."""
    try:
        app()
    except VlmrlError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if e.errno not in _STORAGE_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        typer.echo(f"error: {e.strerror}{where}: free space or make the run directory writable, then "
                   "continue the run with `vlmrl run CONFIG --resume`", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
