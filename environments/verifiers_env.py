"""What the adapters for ``verifiers`` environments share, and the single-turn adapter.

:func:`environments.modules.load_module_env` builds an ``[env] id`` that names a module; it
may give an environment of verifiers' classic API (``verifiers>=0.1.8,<0.4``):

* a single-turn one (``vf.SingleTurnEnv``), which :class:`VerifiersEnvironment` (here) wraps:
  prompts come from the verifiers dataset (chat messages with ``image_url`` data-URL parts),
  rewards from its rubric;
* a multi-turn one (``vf.MultiTurnEnv``: ``env_response``, ``@vf.stop`` conditions), which
  :class:`~environments.verifiers_multiturn.VerifiersMultiTurnEnvironment` plays as a vlmrl
  :class:`MultiTurnEnvironment` (an episode per dataset row, scored by the rubric when it
  ends). ``[env.args]`` may then hold ``vlmrl_max_turns`` (:data:`MAX_TURNS_ARG`, not passed
  to ``load_environment``): the most replies per episode.

This module holds the adapters' shared base (dataset splits, row order, private event loop,
rubric scoring, message and image conversion) and the single-turn adapter;
:mod:`environments.verifiers_multiturn` holds the multi-turn adapter.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import inspect
import io
import json
import random
import threading
from contextlib import nullcontext
from typing import Any, Coroutine, TypeVar

from PIL import Image

from environments.base import Environment, Example, Score

T = TypeVar("T")

INSTALL_HINT = 'pip install -e ".[verifiers]"'
#: share of a dataset held out for eval when the verifiers environment has no eval_dataset
HOLDOUT_FRACTION = 0.1
#: the ``[env.args]`` key that caps a multi-turn verifiers episode (kept from ``load_environment``)
MAX_TURNS_ARG = "vlmrl_max_turns"


def _verifiers() -> Any:
    try:
        import verifiers as vf
    except ImportError:
        raise ImportError(f"verifiers environments need verifiers: {INSTALL_HINT}") from None
    return vf


def _check_classic(env: Any, env_id: str) -> bool:
    """Refuse what the adapters cannot run, with a one-line reason; True for a multi-turn env."""
    cls = type(env)
    if any(c.__module__.startswith("verifiers.v1") for c in cls.__mro__):
        raise ValueError(f"{env_id!r} is a verifiers.v1 environment ({cls.__name__}); vlmrl supports verifiers' "
                         "classic API only (verifiers>=0.1.8,<0.4)")
    vf = _verifiers()
    if not isinstance(env, vf.Environment):
        raise ValueError(f"load_environment() of {env_id!r} returned {cls.__name__}, neither a vlmrl nor a "
                         "verifiers environment")
    multi_turn = isinstance(env, vf.MultiTurnEnv) and not isinstance(env, vf.SingleTurnEnv)
    tool_env = getattr(vf, "ToolEnv", None)
    if multi_turn and ((tool_env is not None and isinstance(env, tool_env)) or getattr(env, "tool_defs", None)):
        raise ValueError(f"{env_id!r} ({cls.__name__}): verifiers environments with tool calls are not supported "
                         "(vlmrl replies are plain text)")
    rubric = env.rubric
    if any(getattr(r, "has_group_rewards", False) for r in [rubric, *getattr(rubric, "rubrics", [])]):
        raise ValueError(f"{env_id!r}: rubrics with group reward functions are not supported yet")
    return multi_turn


def _decode_data_url(url: str, example_id: Any) -> Image.Image:
    head, sep, data = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise ValueError(f"example {example_id}: image_url is not a base64 image data URL: {url[:48]!r}")
    try:
        img = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        img.load()
    except (binascii.Error, ValueError, OSError) as e:
        raise ValueError(f"example {example_id}: bad image data URL ({e})") from None
    return img.convert("RGB")


def _part(part: Any, example_id: Any) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("text") or ""}
    if kind == "image_url":
        ref = part.get("image_url")  # a dict, a string, or verifiers' ImageUrlSource (0.2+)
        url = ref if isinstance(ref, str) else ref.get("url") if hasattr(ref, "get") else None
        if not isinstance(url, str):
            raise ValueError(f"example {example_id}: image_url part without a url")
        return {"type": "image", "image": _decode_data_url(url, example_id)}
    raise ValueError(f"example {example_id}: unsupported content part type {kind!r}")


def convert_prompt(prompt: Any, example_id: Any) -> list[dict[str, Any]]:
    """A verifiers chat ``prompt`` (OpenAI-style messages: dicts, or verifiers' pydantic
    messages) as vlmrl messages with PIL images."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    messages = []
    for msg in prompt:
        content = msg.get("content")
        parts = [_part(content, example_id)] if isinstance(content, str) else [
            _part(p, example_id) for p in (content or [])]
        messages.append({"role": msg["role"], "content": parts})
    return messages


def _normalize(messages: Any, field_name: str) -> Any:
    """verifiers' own message normalization (pydantic messages, 0.2+); dicts as they are before."""
    try:
        from verifiers.utils.message_utils import normalize_messages
    except ImportError:  # verifiers 0.1.x: plain dict messages
        return messages
    return normalize_messages(messages, field_name=field_name)


class _VerifiersAdapter:
    """What both adapters share: the classic env, its train/eval rows, the private event loop.

    Training uses the dataset's rows in a seeded shuffle per epoch (wrapping around); eval
    reads ``eval_dataset``, or the last :data:`HOLDOUT_FRACTION` of the dataset (then left out
    of training) when there is none. verifiers' coroutines (rubrics, ``env_response``...) run
    on a private event loop in its own thread, so callers may be threads or inside a loop.
    """

    id: str

    def _init_adapter(self, env: Any, env_id: str, seed: int) -> None:
        self.vf_env = env
        self.id = env_id
        self.seed = seed
        try:
            dataset = env.get_dataset()
        except ValueError:
            raise ValueError(f"{env_id!r}: the verifiers environment has no training dataset") from None
        if hasattr(env, "build_eval_dataset"):
            env.build_eval_dataset()
        n = len(dataset)
        self._train: list[int]
        self._eval: list[int] | None
        if env.eval_dataset is not None:
            self._train, self._eval = list(range(n)), None
        else:
            if n < 2:
                raise ValueError(f"{env_id!r}: {n} row(s) and no eval_dataset; need at least 2 to hold some out")
            held = max(1, round(n * HOLDOUT_FRACTION))
            self._train, self._eval = list(range(n - held)), list(range(n - held, n))
        if not self._train:
            raise ValueError(f"{env_id!r}: the verifiers environment's dataset is empty")
        self._dataset = dataset
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    def _row(self, split: str, index: int) -> dict[str, Any]:
        return dict(self._dataset[index] if split == "train" else self.vf_env.eval_dataset[index])

    def _train_rows(self, step: int, n: int) -> list[int]:
        """The dataset rows of ``step``'s ``n`` training prompts (a seeded shuffle per epoch)."""
        size = len(self._train)
        rows = []
        for i in range(n):
            pos = step * n + i
            order = list(self._train)
            random.Random(f"{self.seed}/{pos // size}").shuffle(order)
            rows.append(order[pos % size])
        return rows

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name=f"vf-{self.id}", daemon=True).start()
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Stop the event loop's thread (a later call starts a new one)."""
        with self._lock:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._loop = None

    def _task_state(self, row: dict[str, Any]) -> Any:
        """A verifiers state holding ``row`` (its input, task and prompt), as ``init_state`` starts it."""
        vf = _verifiers()
        row = copy.deepcopy(row)
        if isinstance(row.get("info"), str):
            row["info"] = json.loads(row["info"]) if row["info"] else {}
        try:
            from verifiers.types import flatten_task_input
        except ImportError:  # verifiers 0.1.x: the row is the input
            flatten_task_input = dict
        task = flatten_task_input(row)
        state = vf.State(input=task)
        state["task"] = task
        state["prompt"] = _normalize(row["prompt"], "input.prompt")
        return state

    async def _score(self, state: Any) -> None:
        rubric = self.vf_env.rubric
        if "score_sem" in inspect.signature(rubric.score_rollout).parameters:  # verifiers 0.1.x
            await rubric.score_rollout(state, score_sem=nullcontext())
        else:  # verifiers 0.2-0.3: verifiers/legacy/rubrics/rubric.py Rubric.score_rollout(state)
            await rubric.score_rollout(state)
        cleanup = getattr(rubric, "cleanup", None)
        if cleanup is not None:
            await cleanup(state)

    @staticmethod
    def _parts(state: Any) -> dict[str, float]:
        return {k: float(v) for k, v in (state.get("metrics") or {}).items()}


class VerifiersEnvironment(_VerifiersAdapter, Environment):
    """A single-turn verifiers environment (classic API) as a vlmrl :class:`Environment`.

    ``train_examples`` walks the dataset in a seeded shuffle per epoch (wrapping around);
    ``eval_examples`` reads ``eval_dataset``, or the last :data:`HOLDOUT_FRACTION` of the
    dataset (then left out of training) when there is none. ``score`` runs the rubric on one
    rollout on a private event loop, in its own thread (callers may be inside a loop).
    """

    def __init__(self, env: Any, env_id: str = "", seed: int = 0) -> None:
        if _check_classic(env, env_id):
            raise ValueError(f"{env_id!r} ({type(env).__name__}) is a multi-turn verifiers environment: "
                             "VerifiersMultiTurnEnvironment runs it")
        self._init_adapter(env, env_id, seed)

    # ------------------------------------------------------------------ examples

    def _example(self, split: str, index: int, ex_id: str) -> Example:
        row = self._row(split, index)
        example_id = row.get("example_id", index)
        info = row.get("info")
        if isinstance(info, str):
            info = json.loads(info) if info else {}
        return Example(
            id=ex_id,
            messages=convert_prompt(row["prompt"], example_id),
            answer=row.get("answer"),
            info={"example_id": example_id, "split": split, "row": index, "info": info or {}},
        )

    def train_examples(self, step: int, n: int) -> list[Example]:
        return [self._example("train", r, f"train-{step}-{i}") for i, r in enumerate(self._train_rows(step, n))]

    def eval_examples(self, n: int) -> list[Example]:
        if self._eval is None:
            rows = list(range(min(n, len(self.vf_env.eval_dataset))))
            return [self._example("eval", r, f"eval-{r}") for r in rows]
        return [self._example("train", r, f"eval-{r}") for r in self._eval[:n]]

    # ------------------------------------------------------------------ scoring

    def _state(self, row: dict[str, Any], completion: str) -> Any:
        """A verifiers rollout state for ``row`` answered by ``completion`` (as ``init_state``
        and a one-turn rollout leave it, without a client)."""
        state = self._task_state(row)
        prompt = state["prompt"]
        reply = _normalize([{"role": "assistant", "content": completion}], "completion")
        state["completion"] = reply
        # one verifiers TrajectoryStep (keyword form: these are verifiers' field names, not vlmrl records)
        state["trajectory"] = [dict(
            prompt=prompt, completion=reply, response=None, tokens=None, reward=None, advantage=None,
            is_truncated=False, trajectory_id="vlmrl", extras={},
        )]
        for key, value in (("is_completed", True), ("is_truncated", False), ("reward", None), ("metrics", None),
                           ("error", None)):
            state[key] = value
        return state

    def score(self, example: Example, completion: str) -> Score:
        row = self._row(example.info["split"], example.info["row"])
        state = self._state(row, completion)
        self._run(self._score(state))
        return Score(reward=float(state.get("reward") or 0.0), parts=self._parts(state))
