"""The run directory: paths, and the primitives that write and tail its files.

```
runs/<name>/
  config.toml  run.json  metrics.jsonl  rollouts.jsonl
  logs/<proc>.log  rollouts/<step>/<file>.png  checkpoints/<step>/
  tensorboard/  wandb/       (report_to: event files; wandb's own folder)
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
    def lock_file(self) -> Path:
        return self.path / records.RUN_LOCK

    @property
    def space_reserve(self) -> Path:
        return self.path / records.SPACE_RESERVE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / records.CHECKPOINTS_DIR

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / records.TENSORBOARD_DIR

    @property
    def wandb_dir(self) -> Path:
        """The folder wandb makes (its runs, offline ones included) when ``WANDB_DIR`` is unset."""
        return self.path / records.WANDB_RUNS_DIR

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
    """Appends one JSON object per line; a line lands whole or not at all.

    Each line is one unbuffered append. A write that fails part-way (a full disk) is cut
    back off before the error is raised, and a file that ends in a partial line (a writer
    killed mid-write) is cut back to its last full line when opened, so a resumed run never
    glues its first record onto a fragment. One writer per file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        _cut_partial_line(self._fd)

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path}: write to a closed JsonlWriter")
        data = (json.dumps(record, default=_json_default, allow_nan=True) + "\n").encode("utf-8")
        done = 0
        try:
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError:
            if done:
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - done)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_partial_line(fd: int) -> None:
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    start = max(0, size - 1024 * 1024)
    tail = os.pread(fd, size - start, start)
    nl = tail.rfind(b"\n")
    os.ftruncate(fd, start + nl + 1 if nl >= 0 else (0 if start == 0 else size))


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


@dataclass
class FileTail:
    """Reads the lines appended to a file since the last call (by byte offset).

    A partial last line (a writer mid-write) is kept back until its newline arrives; a
    file cut back to where that line began (a killed writer's fragment removed) is read on
    from there. A new file is read from its start: one that replaced this one (another
    inode, as ``os.replace`` makes), one that appears after this one was seen missing, and
    one that shrank further (truncated). A file truncated or deleted and created again in
    place between two reads, with at least as many bytes as the whole lines read, cannot be
    told from an appended one
    (ext4 gives the new file the old inode number).
    """

    path: Path
    offset: int = 0
    _partial: bytes = field(default=b"", repr=False)
    _file_id: tuple[int, int] | None = field(default=None, repr=False)  # (st_dev, st_ino) last read

    def read_lines(self, max_bytes: int = 16 * 1024 * 1024) -> list[str]:
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:  # deleted (or mid-rotation): what appears next is a new file
            self.offset, self._partial, self._file_id = 0, b"", None
            return []
        except OSError:
            return []
        with f:
            st = os.fstat(f.fileno())  # of the file opened, not of whatever the path names by now
            file_id = (st.st_dev, st.st_ino)
            if self._file_id is not None and file_id != self._file_id:
                self.offset, self._partial = 0, b""
            elif st.st_size < self.offset:
                if st.st_size >= self.offset - len(self._partial):
                    # only the unfinished last line was cut (JsonlWriter repairs a file a killed
                    # writer left mid-line): read on from where that line began
                    self.offset, self._partial = self.offset - len(self._partial), b""
                else:
                    self.offset, self._partial = 0, b""
            self._file_id = file_id
            if st.st_size == self.offset:
                return []
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
            except (ValueError, RecursionError):  # RecursionError: nested past the parser's depth
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
