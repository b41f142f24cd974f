"""The multi-turn ``verifiers`` adapter: a classic ``vf.MultiTurnEnv`` played as a vlmrl
:class:`MultiTurnEnvironment`, one model reply a turn, scored by the env's rubric when the
episode ends. :func:`environments.modules.load_module_env` builds it for multi-turn
verifiers environments; the shared base and the single-turn adapter live in that module.
An episode has at most ``vlmrl_max_turns`` replies (an ``[env.args]`` key), by default the
verifiers environment's ``max_turns``, or :data:`DEFAULT_MAX_TURNS` when that is unbounded (-1).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from environments.base import Episode, MultiTurnEnvironment, Score, Transition
from environments.verifiers_env import _check_classic, _normalize, _verifiers, _VerifiersAdapter, convert_prompt

#: replies per episode of a multi-turn verifiers environment whose ``max_turns`` is unbounded
DEFAULT_MAX_TURNS = 10


@dataclass
class VerifiersGame:
    """The game of one :class:`VerifiersMultiTurnEnvironment` episode: verifiers' rollout state
    and the verifiers-side prompt of the next turn (the whole conversation so far)."""

    state: Any
    prompt: Any
    example_id: Any


#: ``stop_condition`` of an episode that vlmrl ended at ``max_turns`` (the verifiers env would go on)
VLMRL_MAX_TURNS = "vlmrl_max_turns"


class VerifiersMultiTurnEnvironment(_VerifiersAdapter, MultiTurnEnvironment):
    """A multi-turn verifiers environment (classic ``vf.MultiTurnEnv``) as a vlmrl :class:`MultiTurnEnvironment`.

    It replays verifiers' ``MultiTurnEnv.rollout`` loop one model reply at a time, with vlmrl
    as the model:

    * seeds are dataset rows: a training seed is a row of ``dataset`` (in the order of
      :class:`~environments.verifiers_env.VerifiersEnvironment`'s examples), an eval seed a
      row of ``eval_dataset`` offset by ``len(dataset)``, or a held-out row of ``dataset``
      when there is no eval set;
    * ``new_game`` builds the row's verifiers state (as ``init_state``, without a client), runs
      ``setup_state``, and shows the first prompt (``get_prompt_messages``; the row's prompt
      with its system message, images decoded) as the first observation;
    * ``play`` appends the reply as a verifiers trajectory step (``add_trajectory_step``), asks
      ``is_completed`` (every ``@vf.stop`` condition: ``max_turns_reached``, ``has_error``,
      ``has_final_env_response``, the env's own), and if the game goes on calls
      ``get_prompt_messages`` (``env_response``) and shows its new messages (text and
      ``image_url`` parts) as the next observation;
    * at the end (a stop condition, or ``max_turns`` of this adapter) it renders the completion
      and runs the env's cleanups as ``rollout`` does, then scores with the rubric. The
      episode's reward is the rubric's reward: a turn's reward is its trajectory step's own
      reward when the env sets one (``add_trajectory_step``/``state.add_step_reward``), else 0,
      and the final turn carries the rest; the rubric's named metrics are its parts.

    ``vf.Error`` from ``env_response`` ends the episode as in verifiers (``has_error``), and
    is scored. Not run: tool calls (refused), verifiers' rollout ``timeout_seconds`` and
    token budgets (there are no verifiers-side model responses or token counts).
    """

    def __init__(self, env: Any, env_id: str = "", seed: int = 0, max_turns: int | None = None) -> None:
        if not _check_classic(env, env_id):
            raise ValueError(f"{env_id!r} ({type(env).__name__}) is a single-turn verifiers environment: "
                             "VerifiersEnvironment runs it")
        self._init_adapter(env, env_id, seed)
        own = getattr(env, "max_turns", -1)
        own = own if isinstance(own, int) and own > 0 else None
        self.max_turns = max_turns if max_turns is not None else own if own is not None else DEFAULT_MAX_TURNS
        self._eval_base = len(self._dataset)

    # ------------------------------------------------------------------ seeds

    def train_seeds(self, step: int, n: int) -> list[int]:
        return self._train_rows(step, n)

    def eval_seeds(self, n: int) -> list[int]:
        if self._eval is None:
            return [self._eval_base + r for r in range(min(n, len(self.vf_env.eval_dataset)))]
        return self._eval[:n]

    def _split_of(self, seed: int) -> tuple[str, int]:
        if 0 <= seed < self._eval_base:
            return "train", seed
        if self._eval is None and 0 <= seed - self._eval_base < len(self.vf_env.eval_dataset):
            return "eval", seed - self._eval_base
        raise ValueError(f"{self.id!r}: no episode with seed {seed} (seeds are rows: 0..{self._eval_base - 1}"
                         + (f", eval {self._eval_base}..{self._eval_base + len(self.vf_env.eval_dataset) - 1}"
                            if self._eval is None else "") + ")")

    # ------------------------------------------------------------------ episodes

    def system_prompt(self) -> str | None:
        return None  # the verifiers prompt holds its system message (the first observation)

    def new_game(self, seed: int) -> tuple[VerifiersGame, list[dict[str, Any]]]:
        split, index = self._split_of(seed)
        row = self._row(split, index)
        example_id = row.get("example_id", index)
        game = self._run(self._start(row, seed, example_id))
        return game, convert_prompt(game.prompt, example_id)

    def _initial_state(self, row: dict[str, Any]) -> Any:
        """The state ``init_state`` gives a rollout of ``row`` (no client: vlmrl is the model)."""
        state = self._task_state(row)
        for key, value in (("client", None), ("model", "vlmrl"), ("sampling_args", None), ("is_completed", False),
                           ("is_truncated", False), ("tool_defs", []), ("trajectory", []), ("completion", None),
                           ("trajectory_id", uuid.uuid4().hex), ("reward", None), ("metrics", None), ("error", None),
                           ("final_env_response", None)):
            state[key] = value
        try:
            from verifiers.types import RolloutTiming
        except ImportError:  # verifiers 0.1.x
            pass
        else:
            state["timing"] = RolloutTiming()
        tracker = getattr(self.vf_env, "_get_usage_tracker", None)
        if tracker is not None:
            tracker(state, create_if_missing=True)
        return state

    async def _start(self, row: dict[str, Any], seed: int, example_id: Any) -> VerifiersGame:
        env = self.vf_env
        vf = _verifiers()
        state = self._initial_state(row)
        try:
            setup = await env.setup_state(state)
        except vf.Error as e:
            raise RuntimeError(f"{self.id!r} episode {seed}: setup_state failed: {e!r}") from None
        if setup is not None:
            state = setup
        if await env.is_completed(state):
            raise RuntimeError(f"{self.id!r} episode {seed}: ended before the first turn "
                               f"(stop condition {state.get('stop_condition')!r})")
        prompt = _normalize(await env.get_prompt_messages(state), "prompt_messages")
        return VerifiersGame(state=state, prompt=prompt, example_id=example_id)

    def play(self, episode: Episode, reply: str) -> Transition:
        last = episode.turn + 1 >= self.max_turns
        return self._run(self._play(episode.game, reply, last, episode.reward))

    async def _play(self, game: VerifiersGame, reply: str, last: bool, earlier: float) -> Transition:
        env, state = self.vf_env, game.state
        vf = _verifiers()
        completion = _normalize([{"role": "assistant", "content": reply}], "completion")
        # a verifiers TrajectoryStep (keyword form: verifiers' field names); no model response object
        step = dict(prompt=game.prompt, completion=completion, response=None, tokens=None, reward=None,
                    advantage=None, is_truncated=False, trajectory_id=state.get("trajectory_id"), extras={})
        await env.add_trajectory_step(state, step)
        done = await env.is_completed(state)
        observation: list[dict[str, Any]] = []
        if not done and last:
            state["is_completed"] = True
            state["stop_condition"] = VLMRL_MAX_TURNS
            done = True
        elif not done:
            conversation = [*game.prompt, *completion]
            try:
                prompt = _normalize(await env.get_prompt_messages(state), "prompt_messages")
            except vf.Error as e:  # as MultiTurnEnv.rollout: the rollout ends (has_error / prompt_too_long)
                if isinstance(e, getattr(vf, "OverlongPromptError", ())):
                    state["prompt_too_long"] = True
                    state["is_truncated"] = True
                else:
                    state["error"] = e
                prompt = None
            if prompt is None or state.get("final_env_response") is not None:
                if not await env.is_completed(state):
                    state["is_completed"] = True
                done = True
            else:
                if len(prompt) < len(conversation) or any(
                        a is not b and a != b for a, b in zip(prompt, conversation)):
                    raise ValueError(f"{self.id!r}: get_prompt_messages() does not extend the conversation; "
                                     "non-linear message sequences are not supported")
                observation = convert_prompt(prompt[len(conversation):], game.example_id)
                game.prompt = prompt
        trajectory = state.get("trajectory") or [step]
        own = trajectory[-1].get("reward")  # set by add_trajectory_step or state.add_step_reward
        own = float(own) if isinstance(own, (int, float)) and not isinstance(own, bool) else None
        info: dict[str, Any] = {} if own is None else {"step_reward": own}
        if not done:
            return Transition(observation=observation, score=Score(own or 0.0), done=False, info=info)
        await self._finish(state)
        info["stop_condition"] = state.get("stop_condition")
        reward = float(state.get("reward") or 0.0)
        return Transition(observation=None, score=Score(reward - earlier, self._parts(state)), done=True, info=info)

    def truncated(self, episode: Episode) -> Score | None:
        """Stopped early for the context: scored by the rubric as it stands (as verifiers does
        with an overlong prompt), the reward beyond the turns' own going to the last turn."""
        state = episode.game.state
        state["prompt_too_long"] = True
        state["is_truncated"] = True
        if not state.get("is_completed"):
            state["is_completed"] = True
        state["stop_condition"] = state.get("stop_condition") or "vlmrl_context"
        self._run(self._finish(state))
        return Score(float(state.get("reward") or 0.0) - episode.reward, self._parts(state))

    async def _finish(self, state: Any) -> None:
        """What ``rollout`` and ``run_rollout`` do after the last turn: render the completion,
        run the env's cleanups, score with the rubric, run its cleanups."""
        env = self.vf_env
        handlers = getattr(env, "_cleanup_handlers", None) or []
        if not any(getattr(h, "__name__", "") == "render_state" for h in handlers):
            await env.render_completion(state)  # verifiers < 0.3 renders outside the cleanups
        cleanup = getattr(env, "cleanup", None)
        if cleanup is not None:
            await cleanup(state)
        await self._score(state)

    def summary(self, episode: Episode) -> dict[str, float]:
        """Turns, reward and the rubric's metrics (``rubric/<name>``)."""
        return {**super().summary(episode), **{f"rubric/{k}": v for k, v in episode.parts.items()}}
