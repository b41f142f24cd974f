"""Experiment trackers: trackio, wandb and TensorBoard, fed by the training loop.

``[trainer.args] report_to`` names them. Each gets every metric of a ``metrics.jsonl`` line
under the same name, at the optimizer step (all but ``step``, the x axis, and ``time``: each
tracker stamps its own), and every ``log_rollouts_every`` steps a table of that step's
rollouts: the first image each saw, prompt, completion, reward, reward parts, advantage.

* trackio: its local store (``$TRACKIO_DIR``, default ``$HF_HOME/trackio``), or a Space or
  server when its own variables name one; ``trackio show --project NAME``.
* wandb: ``wandb.init`` as wandb's variables say (``WANDB_MODE=offline`` works without
  network); its ``wandb/`` folder goes in the run directory unless ``WANDB_DIR`` is set.
* tensorboard: event files in ``<run dir>/tensorboard``; a run that starts at step k (fresh:
  0, resumed: the checkpoint's) hides the events an earlier run logged from step k+1 on.

The run directory stays the record; trackers are copies for the tools people already use.
All tracker work (import, init, log, finish) happens on one daemon thread: the training step
only queues a dict, and a slow or hung tracker never holds it back. A tracker that is not
installed, or raises (or, for trackio, reports a failure) at any time, is dropped with one
warning in the trainer's log and the run goes on.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import queue
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from backend import records as rec
from backend.config import MultimodalRLConfig
from backend.rollout_types import Rollout
from backend.rollout_writer import prompt_text
from backend.rundir import RunDirectory

#: seconds :meth:`Trackers.close` waits for the trackers to finish (uploads included)
CLOSE_TIMEOUT_S = 300.0
#: rollout tables that may wait for the trackers (they hold the step's images); more are skipped
MAX_QUEUED_TABLES = 4
_event_files = itertools.count()  # one event file name per writer, even two in one second
#: the key of the rollout table (trackio, wandb) and the prefix of its TensorBoard tags
ROLLOUTS_KEY = "rollouts"


@dataclass(frozen=True)
class RolloutRow:
    """One row of a rollout table."""

    step: int
    group: int
    example_id: str
    image: Any  # a PIL image (the first the rollout saw), or None; rows of one prompt share it
    prompt: str
    completion: str
    reward: float
    parts: Mapping[str, float] = field(default_factory=dict)
    advantage: float | None = None


def rollout_rows(step: int, rollouts: Sequence[Rollout]) -> list[RolloutRow]:
    """The table rows of ``rollouts``. Images are copied: the rollout writer saves the same
    PIL objects on its own thread, and ``Image.save`` sets attributes on the image it saves."""
    images: dict[tuple[str, int], Any] = {}
    rows = []
    for r in rollouts:
        key = (r.example_id, r.group) if not r.is_episode else (r.example_id, -1 - r.index)
        if key not in images:
            images[key] = r.images[0].copy() if r.images else None
        prompt = prompt_text(r.messages[: r.turns[0].prompt_end] if r.turns else r.messages)
        rows.append(RolloutRow(step, r.group, r.example_id, images[key], prompt, r.completion, float(r.reward),
                               dict(r.reward_parts), r.advantage))
    return rows


def table(rows: Sequence[RolloutRow], image: Callable[[Any], Any]) -> tuple[list[str], list[list[Any]]]:
    """``(columns, data)`` of a rollout table; ``image`` wraps each PIL image (shared per prompt)."""
    parts = sorted({p for r in rows for p in r.parts})
    columns = ["step", "group", "example_id", "image", "prompt", "completion", "reward",
               *(f"reward/{p}" for p in parts), "advantage"]
    wrapped: dict[int, Any] = {}
    data = []
    for r in rows:
        if r.image is not None and id(r.image) not in wrapped:
            wrapped[id(r.image)] = image(r.image)
        data.append([r.step, r.group, r.example_id, wrapped.get(id(r.image)), r.prompt, r.completion, r.reward,
                     *(r.parts.get(p) for p in parts), r.advantage])
    return columns, data


def markdown_table(rows: Sequence[RolloutRow]) -> str:
    """The rollout table as Markdown (TensorBoard's text tab renders it)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", "<br>")

    columns, data = table(rows, lambda img: None)
    keep = [i for i, c in enumerate(columns) if c != "image"]
    lines = ["| " + " | ".join(columns[i] for i in keep) + " |", "|" + " --- |" * len(keep)]
    lines += ["| " + " | ".join(cell(row[i]) for i in keep) + " |" for row in data]
    return "\n".join(lines)


class Tracker:
    """One experiment tracker. Methods may raise: :class:`Trackers` drops the tracker then."""

    name = "tracker"
    where = ""  # where its data goes, for the trainer's log

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        raise NotImplementedError

    def rollouts(self, step: int, rows: Sequence[RolloutRow]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        raise NotImplementedError

    def failure(self) -> str | None:
        """A failure the library reported without raising (None: none)."""
        return None


class TrackioTracker(Tracker):
    """trackio: local SQLite store (or the Space/server its variables name)."""

    name = "trackio"

    def __init__(self, project: str, run: str, config: Mapping[str, Any], resume: bool) -> None:
        import trackio
        from trackio import utils as trackio_utils

        self._trackio = trackio
        self._failure: str | None = None
        remote = os.environ.get("TRACKIO_SPACE_ID") or os.environ.get("TRACKIO_SERVER_URL")
        if not remote:
            store = Path(trackio_utils.TRACKIO_DIR)
            # trackio only warns when its store is unusable; fail here, where it can be said
            store.mkdir(parents=True, exist_ok=True)
            self.where = f"project {project}, run {run}, in {store} (trackio show --project {project})"
        else:
            self.where = f"project {project}, run {run}, on {remote}"
        self._run = trackio.init(project=project, name=run, config=dict(config), resume="allow" if resume else "never",
                                 embed=False, auto_log_gpu=False, auto_log_cpu=False)
        # trackio reports a failure as a warning and goes on: a write that failed on its own
        # thread (Run._warn_once), a value it could not log (on this thread). The first becomes
        # this tracker's failure, which Trackers reports once, instead of being printed.
        if hasattr(self._run, "_warn_once"):
            self._run._warn_once = lambda key, message: self._fail(message)
        self._module = sys.modules.get("trackio.run")
        self._emit = getattr(self._module, "_emit_nonfatal_warning", None)
        if self._emit is not None:
            mine, emit = threading.current_thread(), self._emit

            def report(message: Any, *args: Any, **kwargs: Any) -> None:
                if threading.current_thread() is mine:
                    self._fail(str(message))
                else:  # another user of trackio in this process
                    emit(message, *args, **kwargs)

            self._module._emit_nonfatal_warning = report

    def _fail(self, message: str) -> None:
        # "... : <error>. User code will continue, but ...": the error is the news
        self._failure = self._failure or message.split(" User code will continue")[0]

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def rollouts(self, step: int, rows: Sequence[RolloutRow]) -> None:
        columns, data = table(rows, self._trackio.Image)
        self._run.log({ROLLOUTS_KEY: self._trackio.Table(columns=columns, data=data)}, step=step)

    def finish(self) -> None:
        try:
            self._run.finish()
        finally:
            if self._emit is not None:
                self._module._emit_nonfatal_warning = self._emit

    def failure(self) -> str | None:
        return self._failure


class WandbTracker(Tracker):
    """wandb, online or offline as its variables say."""

    name = "wandb"

    def __init__(self, project: str, run: str, config: Mapping[str, Any], run_dir: RunDirectory) -> None:
        import wandb

        self._wandb = wandb
        kwargs: dict[str, Any] = {}
        if not os.environ.get("WANDB_DIR"):
            kwargs["dir"] = str(run_dir.path)  # wandb makes run_dir.wandb_dir there
        # console off: wandb would wrap the trainer's stdout, which already goes to logs/trainer.log.
        # create_new: a wandb run of the Python API's caller stays untouched.
        self._run = wandb.init(project=project, name=run, config=dict(config), reinit="create_new",
                               settings=wandb.Settings(console="off", silent=True), **kwargs)
        sync_dir = self._run.settings.sync_dir
        offline = self._run.settings.mode == "offline"
        self.where = (f"offline run in {sync_dir} (upload: wandb sync {sync_dir})" if offline
                      else f"{self._run.url} (files in {sync_dir})")

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=step)

    def rollouts(self, step: int, rows: Sequence[RolloutRow]) -> None:
        columns, data = table(rows, self._wandb.Image)
        self._run.log({ROLLOUTS_KEY: self._wandb.Table(columns=columns, data=data)}, step=step)

    def finish(self) -> None:
        self._run.finish()


class TensorboardTracker(Tracker):
    """TensorBoard event files, written on the trackers' thread (tensorboard's own writer
    thread would print a traceback of its own on an error)."""

    name = "tensorboard"

    def __init__(self, logdir: Path, purge_step: int) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.plugins.text import metadata as text_metadata
        from tensorboard.summary.writer.record_writer import RecordWriter
        from tensorboard.util import tensor_util

        self._event, self._summary, self._tensor_util = event_pb2, summary_pb2, tensor_util
        self._text_meta = text_metadata.create_summary_metadata(display_name="", description="")
        logdir.mkdir(parents=True, exist_ok=True)
        # the file name tensorboard's own writer uses (its loader orders files by it)
        self._file = _AppendFile(logdir / f"events.out.tfevents.{time.time():010.0f}.{socket.gethostname()}."
                                          f"{os.getpid()}.{next(_event_files)}")
        self._writer = RecordWriter(self._file)
        self.where = f"{logdir} (tensorboard --logdir {logdir})"
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
        # what SummaryWriter(purge_step=) writes: the loader then hides events of an earlier run from this step on
        self._write(event_pb2.Event(wall_time=time.time(), step=purge_step,
                                    session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        self._file.flush()

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())

    def _summary_event(self, step: int, values: list[Any]) -> Any:
        return self._event.Event(wall_time=time.time(), step=step, summary=self._summary.Summary(value=values))

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        Value = self._summary.Summary.Value
        self._write(self._summary_event(step, [Value(tag=k, simple_value=float(v)) for k, v in values.items()]))
        self._file.flush()

    def rollouts(self, step: int, rows: Sequence[RolloutRow]) -> None:
        S = self._summary.Summary
        values = []
        seen: set[int] = set()
        for r in rows:  # one image per group (a prompt, or the episodes of one seed), as the dashboard shows them
            if r.image is None or r.group in seen:
                continue
            seen.add(r.group)
            img = r.image.convert("RGB")
            png = io.BytesIO()
            img.save(png, format="PNG")
            values.append(S.Value(tag=f"{ROLLOUTS_KEY}/image/{r.group}", image=S.Image(
                height=img.height, width=img.width, colorspace=3, encoded_image_string=png.getvalue())))
        text = self._tensor_util.make_tensor_proto([markdown_table(rows)])
        values.append(S.Value(tag=f"{ROLLOUTS_KEY}/table", metadata=self._text_meta, tensor=text))
        self._write(self._summary_event(step, values))
        self._file.flush()

    def finish(self) -> None:
        self._file.flush()


class _AppendFile:
    """Bytes gathered in memory and appended to ``path`` at each flush (opened each time, as
    tensorboard's own file layer does: a folder gone since is an error, not lost data)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._buf = bytearray()
        path.touch()

    def write(self, data: bytes) -> None:
        self._buf += data

    def flush(self) -> None:
        if self._buf:
            with open(self.path, "ab") as f:
                f.write(self._buf)
            self._buf.clear()

    def close(self) -> None:
        self.flush()


def _reason(e: BaseException) -> str:
    if isinstance(e, ImportError):
        return f"not installed ({e})"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300]}" if text else type(e).__name__


class Trackers:
    """The trackers of one run, fed on their own thread.

    :meth:`step` queues a step's metrics (and, when due, its rollouts) and returns at once;
    :meth:`close` finishes every tracker. Neither raises: a tracker that fails is dropped
    with one ``warning: tracker NAME disabled: ...`` line through ``log``.
    """

    def __init__(self, names: Sequence[str], run_dir: RunDirectory, *, project: str, config: Mapping[str, Any],
                 rollouts_every: int, start_step: int, log: Callable[[str], None]) -> None:
        self.names = list(names)
        self.run_dir = run_dir
        self.project = project
        self.run_name = run_dir.path.resolve().name  # the run directory's name, as the dashboard shows it
        self.config = dict(config)
        self.rollouts_every = rollouts_every
        self.start_step = start_step
        self.log = log
        self.disabled: dict[str, str] = {}  # name -> why
        self._queue: queue.SimpleQueue[tuple[str, int, Any] | None] = queue.SimpleQueue()
        self._tables_queued = 0  # rollout tables waiting (they hold images): at most MAX_QUEUED_TABLES
        self._tables_lock = threading.Lock()
        self._skipped_tables = 0
        self._notes: queue.SimpleQueue[str] = queue.SimpleQueue()  # log lines, said by the training thread
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="trackers", daemon=True)
        self._thread.start()

    # --- the training thread ----------------------------------------------------------------

    def step(self, line: Mapping[str, Any], rollouts: Sequence[Rollout]) -> None:
        """Queue the metrics of one ``metrics.jsonl`` line and, every ``rollouts_every`` steps,
        a table of ``rollouts`` (skipped while :data:`MAX_QUEUED_TABLES` wait to be sent)."""
        self._say_notes()
        step = rec.line_step(line)
        if step is None or self._closed:
            return
        values = {k: v for k, v in line.items() if k not in (rec.STEP, rec.TIME)
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}  # null: no value this step
        self._queue.put(("metrics", step, values))
        if self.rollouts_every and step % self.rollouts_every == 0:
            with self._tables_lock:
                full = self._tables_queued >= MAX_QUEUED_TABLES
                self._tables_queued += not full
            if full:
                self._skipped_tables += 1
            else:
                self._queue.put((ROLLOUTS_KEY, step, list(rollouts)))

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Send what is queued, finish every tracker (at most ``timeout_s``); never raises."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout_s)
        self._say_notes()
        if self._thread.is_alive():
            self.log(f"warning: trackers still busy after {timeout_s:.0f}s; left behind "
                     f"(the run directory has every metric)")
        if self._skipped_tables:
            self.log(f"trackers: {self._skipped_tables} rollout table(s) skipped: {MAX_QUEUED_TABLES} were "
                     "still waiting to be sent")

    def _say_notes(self) -> None:
        """Log what the trackers' thread had to say (here: the trainer's log stays one thread's)."""
        while True:
            try:
                note = self._notes.get_nowait()
            except queue.Empty:
                return
            self.log(note)

    # --- the trackers' thread ---------------------------------------------------------------

    def _open(self, name: str) -> Tracker:
        resumed = self.start_step > 0
        if name == "trackio":
            return TrackioTracker(self.project, self.run_name, self.config, resume=resumed)
        if name == "wandb":
            return WandbTracker(self.project, self.run_name, self.config, self.run_dir)
        if name == "tensorboard":
            return TensorboardTracker(self.run_dir.tensorboard_dir, purge_step=self.start_step + 1)
        raise ValueError(f"unknown tracker {name!r}")  # config.py lets none through

    def _drop(self, name: str, reason: str, tracker: Tracker | None = None) -> None:
        reason = reason.strip().rstrip(".")
        self.disabled[name] = reason
        hint = f" (pip install 'vlmrl[{name}]')" if reason.startswith("not installed") else ""
        self._notes.put(f"warning: tracker {name} disabled: {reason}{hint}; the run goes on, its run directory "
                        "has every metric")
        if tracker is not None:
            with contextlib.suppress(Exception):  # release its files and threads; the error is reported
                tracker.finish()

    def _call(self, active: list[Tracker], what: str, fn: Callable[[Tracker], None]) -> None:
        for t in list(active):
            try:
                fn(t)
                why = t.failure()
            except Exception as e:  # noqa: BLE001 - a tracker never stops training
                why = f"{what} failed: {_reason(e)}"
            if why is not None:
                active.remove(t)
                self._drop(t.name, why, t if what != "finish" else None)

    def _work(self) -> None:
        active: list[Tracker] = []
        try:
            for name in self.names:
                try:
                    t = self._open(name)
                except Exception as e:  # noqa: BLE001 - ImportError included: reported, never raised
                    offline = os.environ.get("WANDB_MODE") in ("offline", "disabled")
                    hint = ("; WANDB_MODE=offline needs no account" if name == "wandb" and not offline
                            and not isinstance(e, ImportError) else "")
                    self._drop(name, _reason(e) + hint)
                    continue
                active.append(t)
                self._notes.put(f"tracker {name}: {t.where}")
            while (item := self._queue.get()) is not None:
                kind, step, payload = item
                if kind == ROLLOUTS_KEY:
                    try:
                        rows = rollout_rows(step, payload)
                    except Exception as e:  # noqa: BLE001 - the table is lost, not the trackers
                        self._notes.put(f"warning: trackers: no rollout table for step {step}: {_reason(e)}")
                        continue
                    finally:
                        with self._tables_lock:
                            self._tables_queued -= 1
                    self._call(active, "logging rollouts", lambda t: t.rollouts(step, rows))
                else:
                    self._call(active, "logging metrics", lambda t: t.metrics(step, payload))
            self._call(active, "finish", lambda t: t.finish())
        except BaseException as e:  # noqa: BLE001 - this thread must say why it stopped
            for t in active:
                self._drop(t.name, f"trackers' thread stopped: {_reason(e)}", t)


def open_trackers(config: MultimodalRLConfig, run_dir: RunDirectory | None, identity: Mapping[str, Any] | None,
                  start_step: int, log: Callable[[str], None]) -> Trackers | None:
    """The trackers ``config.report_to`` names for a run that starts after ``start_step``
    (None when it names none). ``identity`` (model, environment, args) is logged as their
    config; without it, the ``[trainer.args]`` table."""
    if not config.report_to:
        return None
    if run_dir is None:
        log(f"warning: report_to = {config.report_to} needs a run directory (run_dir=); no tracker opened")
        return None
    return Trackers(config.report_to, run_dir, project=config.tracker_project,
                    config=identity or config.model_dump(mode="json"), rollouts_every=config.log_rollouts_every,
                    start_step=start_step, log=log)
