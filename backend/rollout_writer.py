"""Writes each step's rollouts to the run directory, off the training loop's critical path.

Per step: the images each group's prompt showed (``rollouts/<step>/<example>-<k>.png``,
once per group) and one :class:`~backend.records.RolloutRecord` line per rollout in
``rollouts.jsonl``, then one :class:`~backend.records.DropRecord` line per example the step
left out (``StepRollouts.dropped``). A helper thread writes a step while the next one trains;
at most one write is pending, and :meth:`RolloutWriter.drain` waits for it (before a
checkpoint, at the end, on any exit), so nothing already produced is lost.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Sequence

from backend.records import DropRecord, RolloutRecord, TurnRecord
from backend.rollout_types import Rollout, dropped_of, image_counts
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


def turn_records(r: Rollout, image_names: list[str]) -> list[TurnRecord]:
    """The turn records of episode ``r`` whose images were saved as ``image_names`` (in order)."""
    counts = image_counts(r.messages)
    out: list[TurnRecord] = []
    prev = 0
    for t in r.turns:
        first = sum(counts[:prev])
        out.append(TurnRecord(
            completion=t.completion, reward=t.reward, reward_parts=dict(t.reward_parts), info=dict(t.info),
            images=image_names[first : first + sum(counts[prev : t.prompt_end])], finish_reason=t.finish_reason,
            prompt_tokens=t.prompt_tokens, completion_tokens=len(t.completion_ids)))
        prev = t.prompt_end
    return out


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
            # an episode's frames are its own; a group's single-turn rollouts share their prompt's
            key = (r.example_id, r.group) if not r.is_episode else (r.example_id, -1 - r.index)
            if key not in saved:
                names: list[str] = []
                stem = r.example_id if not r.is_episode else f"{r.example_id}-e{r.index}"
                for k, img in enumerate(r.images):
                    img_dir.mkdir(parents=True, exist_ok=True)
                    name = f"{stem}-{k}.png"
                    img.save(img_dir / name)
                    names.append(f"{rel.as_posix()}/{name}")  # relative to the run dir
                saved[key] = names
            record = RolloutRecord(
                step=step, index=r.index, group=r.group, example_id=r.example_id, prompt=prompt_text(r.messages[: r.turns[0].prompt_end] if r.turns else r.messages),
                completion=r.completion, reward=r.reward, reward_parts=dict(r.reward_parts), advantage=r.advantage,
                answer=_answer(r.answer), finish_reason=r.finish_reason, weight_version=r.weight_version,
                images=saved[key], turns=turn_records(r, saved[key]), end_reason=r.end_reason,
                summary=dict(r.summary),
            )
            self._lines.write(record.to_json())
        for d in dropped_of(rollouts):
            self._lines.write(DropRecord(step, d.index, d.group, d.example_id, d.reason, d.code).to_json())
