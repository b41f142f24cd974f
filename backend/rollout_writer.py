"""Writes each step's rollouts to the run directory, off the training loop's critical path.

Per step: the images each group's prompt showed (``rollouts/<step>/<example>-<k>.png``,
once per group) and one :class:`~backend.records.RolloutRecord` line per rollout in
``rollouts.jsonl``. A helper thread writes a step while the next one trains; at most one
write is pending, and :meth:`RolloutWriter.drain` waits for it (before a checkpoint, at the
end, on any exit), so nothing already produced is lost.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Sequence

from backend.records import RolloutRecord
from backend.rollout_types import Rollout
from backend.rundir import JsonlWriter, RunDirectory


def prompt_text(messages: list[dict[str, Any]]) -> str:
    """A prompt's text for the record: text parts joined, each image as ``<image>``."""
    parts: list[str] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for p in content:
                if p.get("type") == "text":
                    parts.append(str(p.get("text", "")))
                elif p.get("type") == "image":
                    parts.append("<image>")
    return " ".join(parts)


def _answer(value: Any) -> str | int | float | bool | None:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


class RolloutWriter:
    """Appends rollout records (and their images) to ``run_dir`` on a helper thread."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir
        self._lines = JsonlWriter(run_dir.rollouts)
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="rollout-writer")
        self._pending: cf.Future[None] | None = None

    def submit(self, step: int, rollouts: Sequence[Rollout]) -> None:
        """Write ``rollouts`` of ``step`` in the background (after the previous write)."""
        self.drain()
        self._pending = self._pool.submit(self.write, step, rollouts)

    def drain(self) -> None:
        """Wait for the pending write (raising its error, if any)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Finish the pending write, stop the thread, close the file (errors raised after)."""
        try:
            self.drain()
        finally:
            self._pool.shutdown(wait=True)
            self._lines.close()

    def write(self, step: int, rollouts: Sequence[Rollout]) -> None:
        """Write ``rollouts`` of ``step`` now (in the caller's thread)."""
        img_dir = self.run_dir.rollout_images(step)
        rel = img_dir.relative_to(self.run_dir.path)
        saved: dict[tuple[str, int], list[str]] = {}
        for r in rollouts:
            key = (r.example_id, r.group)
            if key not in saved:
                names: list[str] = []
                for k, img in enumerate(r.images):
                    img_dir.mkdir(parents=True, exist_ok=True)
                    name = f"{r.example_id}-{k}.png"
                    img.save(img_dir / name)
                    names.append(f"{rel.as_posix()}/{name}")  # relative to the run dir
                saved[key] = names
            record = RolloutRecord(
                step=step, index=r.index, group=r.group, example_id=r.example_id, prompt=prompt_text(r.messages),
                completion=r.completion, reward=r.reward, reward_parts=dict(r.reward_parts), advantage=r.advantage,
                answer=_answer(r.answer), finish_reason=r.finish_reason, weight_version=r.weight_version,
                images=saved[key],
            )
            self._lines.write(record.to_json())
