"""The run directory: the single source of truth every view reads.

```
runs/<name>/
  config.toml  run.json  metrics.jsonl  rollouts.jsonl
  logs/<proc>.log  rollouts/<step>/<file>.png  checkpoints/<step>/
```

Writers append whole lines and flush them; ``run.json`` is replaced atomically. Readers
tail files by byte offset and keep a partial last line for the next read, so a view can
attach to a live or a finished run at any time.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

CONFIG_FILE = "config.toml"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
EVAL_FILE = "eval.jsonl"
LOGS_DIR = "logs"
ROLLOUT_IMAGES_DIR = "rollouts"
CHECKPOINTS_DIR = "checkpoints"

PROC_SERVER = "server"
PROC_TRAINER = "trainer"


class RunDirectory:
    """Paths of one run directory (creating nothing until asked)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def run_json(self) -> Path:
        return self.path / RUN_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def rollouts(self) -> Path:
        return self.path / ROLLOUTS_FILE

    @property
    def eval(self) -> Path:
        return self.path / EVAL_FILE

    @property
    def logs_dir(self) -> Path:
        return self.path / LOGS_DIR

    def log(self, proc: str) -> Path:
        return self.logs_dir / f"{proc}.log"

    def rollout_images(self, step: int) -> Path:
        return self.path / ROLLOUT_IMAGES_DIR / str(step)

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / str(step)

    def latest_checkpoint(self) -> Path | None:
        """The complete checkpoint with the highest step, if any."""
        if not self.checkpoints_dir.is_dir():
            return None
        steps = [
            int(p.name)
            for p in self.checkpoints_dir.iterdir()
            if p.name.isdigit() and (p / "COMPLETE").exists()
        ]
        return self.checkpoint(max(steps)) if steps else None

    def create(self) -> "RunDirectory":
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        return self

    def exists(self) -> bool:
        return self.path.is_dir()


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON: temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
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


class RunReader:
    """Incremental view of a run directory for headless mode and the TUI."""

    def __init__(self, path: str | Path) -> None:
        self.rd = RunDirectory(path)
        self.metrics_tail = JsonlTail(self.rd.metrics)
        self.rollouts_tail = JsonlTail(self.rd.rollouts)
        self._log_tails: dict[str, FileTail] = {}

    def new_metrics(self) -> list[dict[str, Any]]:
        return self.metrics_tail.read()

    def new_rollouts(self) -> list[dict[str, Any]]:
        return self.rollouts_tail.read()

    def run_info(self) -> dict[str, Any] | None:
        return read_json(self.rd.run_json)

    def new_log_lines(self, proc: str) -> list[str]:
        tail = self._log_tails.get(proc)
        if tail is None:
            tail = self._log_tails[proc] = FileTail(self.rd.log(proc))
        return tail.read_lines()

    def log_names(self) -> list[str]:
        if not self.rd.logs_dir.is_dir():
            return []
        return sorted(p.stem for p in self.rd.logs_dir.glob("*.log"))


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
