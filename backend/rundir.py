"""The run directory: paths, and the primitives that write and tail its files.

```
runs/<name>/
  config.toml  run.json  metrics.jsonl  rollouts.jsonl
  logs/<proc>.log  rollouts/<step>/<file>.png  checkpoints/<step>/
```

File names and record schemas belong to :mod:`backend.records`. Writers append whole
lines and flush them; ``run.json`` is replaced atomically. Readers tail files by byte
offset and keep a partial last line for the next read, so a view can attach to a live or
a finished run at any time.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from backend import records


class RunDirectory:
    """Paths of one run directory (creating nothing until asked)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / records.CONFIG_FILE

    @property
    def run_json(self) -> Path:
        return self.path / records.RUN_FILE

    @property
    def metrics(self) -> Path:
        return self.path / records.METRICS_FILE

    @property
    def rollouts(self) -> Path:
        return self.path / records.ROLLOUTS_FILE

    @property
    def eval(self) -> Path:
        return self.path / records.EVAL_FILE

    @property
    def eval_scores(self) -> Path:
        return self.path / records.EVAL_SCORES_FILE

    def eval_run(self, label: str) -> Path:
        """The run directory of the server ``vlmrl eval`` started for model ``label``."""
        return self.path / records.EVAL_RUNS_DIR / label

    @property
    def sbatch(self) -> Path:
        return self.path / records.SBATCH_FILE

    def slurm_output(self, job_id: str = "%j") -> Path:
        """The SLURM job's output file (``%j``: the pattern sbatch fills in)."""
        return self.logs_dir / records.SLURM_OUTPUT.replace("%j", job_id)

    @property
    def logs_dir(self) -> Path:
        return self.path / records.LOGS_DIR

    def log(self, proc: str) -> Path:
        return self.logs_dir / f"{proc}{records.LOG_SUFFIX}"

    def log_names(self) -> list[str]:
        """Processes that have a log file, in display order."""
        try:
            names = [p.name[: -len(records.LOG_SUFFIX)] for p in self.logs_dir.glob(f"*{records.LOG_SUFFIX}")]
        except OSError:
            return []
        return sorted(names, key=records.proc_sort_key)

    @property
    def rollout_images_dir(self) -> Path:
        return self.path / records.ROLLOUT_IMAGES_DIR

    def rollout_images(self, step: int) -> Path:
        return self.rollout_images_dir / str(step)

    @property
    def control_socket(self) -> Path:
        return self.path / records.CONTROL_SOCKET

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / records.CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / str(step)

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint with the highest step, if any."""
        if not self.checkpoints_dir.is_dir():
            return None
        steps = [
            int(p.name)
            for p in self.checkpoints_dir.iterdir()
            if p.name.isdigit() and checkpoint_complete(p)
        ]
        return self.checkpoint(max(steps)) if steps else None

    def run_info(self) -> "records.RunInfo | None":
        """``run.json`` parsed (None while it does not exist); see :meth:`records.RunInfo.read`."""
        return records.RunInfo.read(self.run_json)

    def create(self) -> "RunDirectory":
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        return self

    def exists(self) -> bool:
        return self.path.is_dir()


def checkpoint_complete(path: str | Path) -> bool:
    """Whether the checkpoint at ``path`` was written whole (its marker is written last)."""
    return (Path(path) / records.CHECKPOINT_MARKER).exists()


def write_json_atomic(path: str | Path, data: Any, *, sort_keys: bool = True) -> None:
    """Replace ``path`` with ``data`` as JSON: temp file in the same folder, then rename
    (``sort_keys=False`` keeps the mappings' own order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=sort_keys)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json(path: str | Path) -> dict[str, Any] | None:
    """Read a JSON file; None if it does not exist or is not (yet) valid."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class JsonlWriter:
    """Appends one JSON object per line, each written whole and flushed."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=_json_default, allow_nan=True) + "\n"
        self._f.write(line)
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class FileTail:
    """Reads the lines appended to a file since the last call (by byte offset).

    A partial last line (a writer mid-write) is kept back until its newline arrives.
    A file that shrank (replaced) is read again from the start.
    """

    path: Path
    offset: int = 0
    _partial: bytes = field(default=b"", repr=False)

    def read_lines(self, max_bytes: int = 16 * 1024 * 1024) -> list[str]:
        try:
            size = self.path.stat().st_size
        except OSError:
            return []
        if size < self.offset:
            self.offset, self._partial = 0, b""
        if size == self.offset:
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            chunk = f.read(max_bytes)
        self.offset += len(chunk)
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [ln.decode("utf-8", errors="replace").rstrip("\r") for ln in lines]


class JsonlTail:
    """Tails a JSONL file and yields parsed records; malformed lines are counted, not raised."""

    def __init__(self, path: str | Path) -> None:
        self._tail = FileTail(Path(path))
        self.bad_lines = 0

    @property
    def path(self) -> Path:
        return self._tail.path

    def read(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for line in self._tail.read_lines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """All complete, valid records of a JSONL file."""
    yield from JsonlTail(path).read()


def last_lines(path: str | Path, n: int = 20, max_bytes: int = 64 * 1024) -> list[str]:
    """The last ``n`` lines of a (log) file, reading at most ``max_bytes`` from its end."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    return lines[-n:]


# What a dying process prints of its cause, before a launcher's summary buries it
# (torchrun's ChildFailedError names a rank and a signal, not why).
_CAUSE = re.compile(r"terminate called|what\(\):|^[\w.]*(Error|Exception)\b|Fatal Python error")
_LAUNCHER = "ChildFailedError"


def failure_lines(path: str | Path, n: int = 20, max_causes: int = 8) -> list[str]:
    """The last ``n`` lines of a failed process's log, preceded by the lines above them that
    say what went wrong (an uncaught C++ exception, a Python error), when the tail does not."""
    lines = last_lines(path, 100_000)
    tail, before = lines[-n:], lines[:-n]
    causes = [ln for ln in before if _CAUSE.search(ln.strip()) and _LAUNCHER not in ln][-max_causes:]
    if not causes or (not any(_LAUNCHER in ln for ln in tail) and any(_CAUSE.search(ln.strip()) for ln in tail)):
        return tail
    return causes + ["..."] + tail
