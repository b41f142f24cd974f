"""Module environments and the verifiers adapters, on real verifiers environments (tests/fixtures):
a SingleTurnEnv (vlmrl_vf_colors) and a MultiTurnEnv game with images (vlmrl_vf_guess)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("verifiers")

import verifiers as vf  # noqa: E402
from datasets import Dataset  # noqa: E402

from environments import Environment, MultiTurnEnvironment, available, make_env  # noqa: E402
from environments.verifiers_env import VerifiersEnvironment  # noqa: E402
from environments.verifiers_multiturn import DEFAULT_MAX_TURNS, VerifiersMultiTurnEnvironment  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _fixtures_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(FIXTURES))


def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    """Write module ``name`` under ``tmp_path`` and make it importable (fresh) for this test."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_verifiers_module_id_builds_a_wrapped_environment_with_pil_images() -> None:
    env = make_env("vlmrl-vf-colors", {"num_train": 6})
    assert isinstance(env, VerifiersEnvironment) and isinstance(env, Environment) and env.id == "vlmrl-vf-colors"
    examples = env.train_examples(0, 4)
    assert [e.id for e in examples] == ["train-0-0", "train-0-1", "train-0-2", "train-0-3"]
    for e in examples:
        assert e.messages[0] == {"role": "system", "content": [{"type": "text", "text": "You name colours."}]}
        user = e.messages[1]
        assert user["role"] == "user" and [p["type"] for p in user["content"]] == ["image", "text"]
        (img,) = e.images
        assert isinstance(img, Image.Image) and img.size == (16, 16)
        # the image is the answer's colour, decoded from the data URL
        assert list(img.getpixel((3, 3))) == e.info["info"]["rgb"]
        assert e.answer in {"red", "green", "blue", "yellow"} and isinstance(e.info["example_id"], int)
    assert "vlmrl-vf-colors" not in available() and "colors" in available()


def test_train_examples_are_a_seeded_shuffle_per_step_that_wraps_around() -> None:
    env = make_env("vlmrl-vf-colors", {"num_train": 6})
    ids = lambda step, n: [e.info["example_id"] for e in env.train_examples(step, n)]  # noqa: E731
    assert ids(1, 3) == ids(1, 3)
    first_epoch = ids(0, 3) + ids(1, 3)
    assert sorted(first_epoch) == list(range(6)) and first_epoch != list(range(6))
    assert sorted(ids(2, 3) + ids(3, 3)) == list(range(6))  # the second epoch: every row again
    assert len(ids(0, 8)) == 8 and sorted(set(ids(0, 8))) == list(range(6))  # n > rows wraps


def test_score_runs_the_rubric_with_weights_and_named_parts() -> None:
    env = make_env("vlmrl-vf-colors", {})
    ex = env.train_examples(0, 1)[0]
    right = env.score(ex, ex.answer)
    assert right.reward == pytest.approx(1.5)  # exact_answer (weight 1) + one_word (weight 0.5)
    assert right.parts["exact_answer"] == 1.0 and right.parts["one_word"] == 1.0
    wrong = env.score(ex, "purple")
    assert wrong.reward == pytest.approx(0.5) and wrong.parts["exact_answer"] == 0.0 and wrong.parts["one_word"] == 1.0
    rambling = env.score(ex, f"I think it is {ex.answer}")
    assert rambling.reward == 0.0 and rambling.parts["one_word"] == 0.0


def test_score_works_from_inside_a_running_event_loop() -> None:
    import asyncio

    env = make_env("vlmrl-vf-colors", {})
    ex = env.train_examples(0, 1)[0]

    async def main() -> float:  # the rollout client calls env.score inside its loop
        return env.score(ex, ex.answer).reward

    assert asyncio.run(main()) == pytest.approx(1.5)


def test_eval_split_is_the_eval_dataset_or_a_held_out_tail() -> None:
    env = make_env("vlmrl-vf-colors", {"num_train": 8, "num_eval": 4})
    evals = env.eval_examples(10)
    assert [e.id for e in evals] == ["eval-0", "eval-1", "eval-2", "eval-3"]
    assert all(e.info["split"] == "eval" for e in evals)
    assert env.score(evals[0], evals[0].answer).reward == pytest.approx(1.5)

    env = make_env("vlmrl-vf-colors", {"num_train": 20, "num_eval": 0})
    held = {e.info["example_id"] for e in env.eval_examples(10)}
    assert held == {18, 19}
    trained = {e.info["example_id"] for step in range(10) for e in env.train_examples(step, 4)}
    assert trained == set(range(18)) and not trained & held


def test_a_bad_data_url_names_the_example() -> None:
    good = {"role": "user", "content": [{"type": "text", "text": "colour?"}]}
    bad = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                       {"type": "text", "text": "colour?"}]}
    ds = Dataset.from_list([{"prompt": [good], "answer": "red"}, {"prompt": [bad], "answer": "red"}])
    env = VerifiersEnvironment(vf.SingleTurnEnv(dataset=ds, eval_dataset=ds, rubric=vf.Rubric(funcs=[_zero])), "t")
    assert env.eval_examples(1)[0].images == []
    with pytest.raises(ValueError, match=r"example 1: bad image data URL"):
        env.eval_examples(2)


def _zero(completion: Any, **kwargs: Any) -> float:
    return 0.0


def _add(a: int, b: int) -> int:
    """Add two numbers."""
    return a + b


def test_tool_envs_are_refused_and_each_adapter_takes_its_own_kind() -> None:
    ds = Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"'tools' \(ToolEnv\): verifiers environments with tool calls are not "
                                         r"supported \(vlmrl replies are plain text\)"):
        VerifiersMultiTurnEnvironment(vf.ToolEnv(dataset=ds, tools=[_add]), "tools")
    import vlmrl_vf_guess

    with pytest.raises(ValueError, match="is a multi-turn verifiers environment: VerifiersMultiTurnEnvironment"):
        VerifiersEnvironment(vlmrl_vf_guess.load_environment(), "guess")
    single = vf.SingleTurnEnv(dataset=ds, eval_dataset=ds, rubric=vf.Rubric(funcs=[_zero]))
    with pytest.raises(ValueError, match="is a single-turn verifiers environment: VerifiersEnvironment runs it"):
        VerifiersMultiTurnEnvironment(single, "single")


def test_an_unknown_id_is_a_key_error_that_mentions_the_module(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError, match="nor an importable module 'no_such_env_xyz'"):
        make_env("no-such-env-xyz")
    from backend.envs import build_env
    from backend.errors import ConfigError

    with pytest.raises(ConfigError, match="env.id: 'no-such-env-xyz' is neither a built-in environment .* "
                                          "nor an importable module 'no_such_env_xyz'"):
        build_env("no-such-env-xyz", {})


def test_a_module_without_load_environment_is_a_value_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module(tmp_path, monkeypatch, "vlmrl_no_loader", "X = 1\n")
    with pytest.raises(ValueError, match="module 'vlmrl_no_loader' has no load_environment"):
        make_env("vlmrl-no-loader")


def test_a_module_needing_verifiers_names_the_extra_when_it_is_missing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _module(tmp_path, monkeypatch, "vlmrl_needs_vf", "import verifiers\n\ndef load_environment():\n    pass\n")
    for name in [m for m in sys.modules if m == "verifiers" or m.startswith("verifiers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "verifiers", None)  # what `import verifiers` meets when it is not installed
    with pytest.raises(ImportError, match=r'needs verifiers: pip install -e "\.\[verifiers\]"'):
        make_env("vlmrl-needs-vf")


def test_a_module_missing_another_package_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module(tmp_path, monkeypatch, "vlmrl_needs_other", "import vlmrl_absent_pkg\n")
    with pytest.raises(ImportError, match="'vlmrl_needs_other' needs 'vlmrl_absent_pkg'"):
        make_env("vlmrl-needs-other")


def test_a_module_may_return_a_vlmrl_environment_and_something_else_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module(tmp_path, monkeypatch, "vlmrl_native_env", """
        from environments.colors import ColorsEnv

        def load_environment(num_colors=3):
            return ColorsEnv(num_colors=num_colors)
    """)
    env = make_env("vlmrl-native-env", {"num_colors": 2})
    assert env.colors == ["red", "green"]  # type: ignore[union-attr]
    _module(tmp_path, monkeypatch, "vlmrl_not_an_env", "def load_environment():\n    return 42\n")
    with pytest.raises(ValueError, match="returned int, neither a vlmrl nor a verifiers environment"):
        make_env("vlmrl-not-an-env")


def test_the_trainer_trains_three_steps_on_a_verifiers_environment(tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from backend.adapters import adapter_for
    from backend.config import MultimodalRLConfig
    from backend.rundir import RunDirectory, read_jsonl
    from backend.trainer import MultimodalGRPOTrainer

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    cfg = MultimodalRLConfig(learning_rate=3e-4, max_steps=3, batch_size=8, micro_batch_size=8, rollouts_per_step=4,
                             max_tokens=4, temperature=1.0, seed=0)
    tr = MultimodalGRPOTrainer(model, processor, adapter_for(model.config, processor=processor), cfg,
                               env=make_env("vlmrl-vf-colors", {}), run_dir=tmp_path, log=lambda s: None)
    history = tr.train()
    assert [h["step"] for h in history] == [1, 2, 3]
    rd = RunDirectory(tmp_path)
    assert [m["step"] for m in read_jsonl(rd.metrics)] == [1, 2, 3]
    rollouts = list(read_jsonl(rd.rollouts))
    assert len(rollouts) == 3 * 8 and all(r["images"] for r in rollouts)
    # the rubric's parts reach the rollout records, and every reward is its weighted sum
    for r in rollouts:
        parts = r["reward_parts"]
        assert {"exact_answer", "one_word"} <= parts.keys()
        assert r["reward"] == pytest.approx(parts["exact_answer"] + 0.5 * parts["one_word"])


# ---------------------------------------------------------------------------- multi-turn

GUESS_COLORS = {"red": [220, 40, 40], "green": [40, 180, 60], "blue": [40, 70, 220], "yellow": [235, 215, 40]}


def _answer(env: VerifiersMultiTurnEnvironment, seed: int) -> str:
    """The colour of episode ``seed``, read off its first image."""
    ep = env.reset(seed)
    (img,) = ep.images
    return next(name for name, rgb in GUESS_COLORS.items() if list(img.getpixel((3, 3))) == rgb)


def _shape(messages: list[dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """Each message's role and parts: text, or an image's size."""
    return [(m["role"], [p["text"] if p["type"] == "text" else p["image"].size for p in m["content"]])
            for m in messages]


def test_a_multi_turn_verifiers_module_builds_a_multi_turn_environment() -> None:
    env = make_env("vlmrl-vf-guess", {})
    assert isinstance(env, VerifiersMultiTurnEnvironment) and isinstance(env, MultiTurnEnvironment)
    assert env.id == "vlmrl-vf-guess" and env.max_turns == 3 and env.system_prompt() is None
    assert isinstance(make_env("vlmrl-vf-colors", {}), VerifiersEnvironment)  # single-turn: as before


def test_an_episode_right_on_the_second_guess_is_rewarded_on_its_last_turn() -> None:
    env = make_env("vlmrl-vf-guess", {})
    seed = env.train_seeds(0, 1)[0]
    answer = _answer(env, seed)
    ep = env.reset(seed)
    assert _shape(ep.messages) == [("system", ["You name colours. Answer with one word."]),
                                   ("user", [(16, 16), "What colour is this image?"])]
    assert ep.seed == seed and ep.turn == 0 and not ep.done

    wrong = "purple" if answer != "purple" else "red"
    tr = env.step(ep, wrong)
    assert not tr.done and tr.score.reward == 0.0 and tr.score.parts == {} and tr.info == {}
    assert _shape(tr.observation or []) == [("user", [(24, 24), "Wrong, try again."])]
    assert _shape(ep.messages)[2:] == [("assistant", [wrong]), ("user", [(24, 24), "Wrong, try again."])]

    tr = env.step(ep, answer.capitalize() + ".")
    assert tr.done and ep.done and tr.observation is None and tr.info == {"stop_condition": "guessed_right"}
    # correct (weight 1) + quick = 1/2 guesses (weight 0.5); verifiers' num_turns metric is a part too
    assert tr.score.reward == pytest.approx(1.25)
    assert tr.score.parts == {"correct": 1.0, "quick": 0.5, "num_turns": 2.0}
    assert ep.reward == pytest.approx(1.25) and [t.score.reward for t in ep.transitions] == [0.0, 1.25]
    assert [m["role"] for m in ep.messages] == ["system", "user", "assistant", "user", "assistant"]
    # every turn's image is in the conversation, in the answer's colour
    assert [img.size for img in ep.images] == [(16, 16), (24, 24)]
    assert all(list(img.getpixel((3, 3))) == GUESS_COLORS[answer] for img in ep.images)
    assert env.summary(ep) == {"turns": 2.0, "reward": pytest.approx(1.25), "rubric/correct": 1.0,
                               "rubric/quick": 0.5, "rubric/num_turns": 2.0}
    with pytest.raises(RuntimeError, match="is over"):
        env.step(ep, answer)


def test_a_right_first_guess_ends_at_once_and_wrong_guesses_end_at_max_turns() -> None:
    env = make_env("vlmrl-vf-guess", {})
    seed = env.train_seeds(0, 1)[0]
    answer = _answer(env, seed)
    ep = env.reset(seed)
    tr = env.step(ep, answer)
    assert tr.done and ep.turn == 1 and tr.score.reward == pytest.approx(1.5)
    assert tr.score.parts == {"correct": 1.0, "quick": 1.0, "num_turns": 1.0}

    ep = env.reset(seed)
    dones = [env.step(ep, "no").done for _ in range(3)]
    assert dones == [False, False, True] and ep.reward == 0.0
    assert ep.transitions[-1].score.parts == {"correct": 0.0, "quick": 0.0, "num_turns": 3.0}
    assert ep.transitions[-1].info == {"stop_condition": "max_turns_reached"}
    assert [img.size for img in ep.images] == [(16, 16), (24, 24), (32, 32)]
    assert [m["role"] for m in ep.messages] == ["system", "user", "assistant", "user", "assistant", "user",
                                                "assistant"]


def test_an_episode_stopped_early_for_the_context_is_scored_by_the_rubric_as_it_stands() -> None:
    env = make_env("vlmrl-vf-guess", {})
    seed = env.train_seeds(0, 1)[0]
    ep = env.reset(seed)
    env.step(ep, "no")
    final = env.truncated(ep)
    assert final is not None and final.reward == pytest.approx(0.0)
    assert final.parts == {"correct": 0.0, "quick": 0.0, "num_turns": 1.0}
    assert ep.game.state["stop_condition"] == "vlmrl_context" and ep.game.state["is_truncated"]


def test_max_turns_come_from_the_verifiers_env_a_default_or_the_env_arg() -> None:
    turns = lambda args: make_env("vlmrl-vf-guess", args).max_turns  # type: ignore[union-attr]  # noqa: E731
    assert turns({"max_turns": 5}) == 5 and turns({"max_turns": -1}) == DEFAULT_MAX_TURNS == 10
    env = make_env("vlmrl-vf-guess", {"max_turns": -1, "vlmrl_max_turns": 2})
    assert isinstance(env, VerifiersMultiTurnEnvironment) and env.max_turns == 2
    ep = env.reset(env.train_seeds(0, 1)[0])
    assert [env.step(ep, "no").done for _ in range(2)] == [False, True]
    # vlmrl ended a game verifiers would go on with: still scored by the rubric
    last = ep.transitions[-1]
    assert last.info == {"stop_condition": "vlmrl_max_turns"} and last.score.parts["num_turns"] == 2.0
    with pytest.raises(ValueError, match="vlmrl_max_turns must be an integer >= 1, got 0"):
        make_env("vlmrl-vf-guess", {"vlmrl_max_turns": 0})
    with pytest.raises(ValueError, match="vlmrl_max_turns applies to multi-turn verifiers environments only"):
        make_env("vlmrl-vf-colors", {"vlmrl_max_turns": 2})


def test_seeds_are_dataset_rows_deterministic_per_step_and_eval_seeds_are_disjoint() -> None:
    env = make_env("vlmrl-vf-guess", {"num_train": 8, "num_eval": 4})
    assert isinstance(env, VerifiersMultiTurnEnvironment)
    assert env.train_seeds(3, 4) == env.train_seeds(3, 4)
    first_epoch = env.train_seeds(0, 4) + env.train_seeds(1, 4)
    assert sorted(first_epoch) == list(range(8)) and first_epoch != list(range(8))
    # the same rows, in the same order, as the single-turn adapter's examples
    single = VerifiersEnvironment(_single_twin(), "twin")
    assert [e.info["row"] for e in single.train_examples(1, 4)] == env.train_seeds(1, 4)
    evals = env.eval_seeds(10)
    assert evals == [8, 9, 10, 11] and env.eval_seeds(2) == [8, 9]
    trained = {s for step in range(20) for s in env.train_seeds(step, 4)}
    assert trained == set(range(8)) and not trained & set(evals)
    # eval seeds play eval_dataset rows (its row i: colour i + 1)
    assert [_answer(env, s) for s in evals] == ["green", "blue", "yellow", "red"]
    assert _answer(env, 0) == "red"
    with pytest.raises(ValueError, match=r"no episode with seed 12 \(seeds are rows: 0..7, eval 8..11\)"):
        env.reset(12)

    held_out = make_env("vlmrl-vf-guess", {"num_train": 20, "num_eval": 0})
    assert held_out.eval_seeds(10) == [18, 19]
    trained = {s for step in range(10) for s in held_out.train_seeds(step, 4)}
    assert trained == set(range(18))


def _single_twin() -> vf.Environment:
    """A single-turn verifiers env with the guess fixture's dataset (8 train rows, an eval set)."""
    import vlmrl_vf_guess

    return vf.SingleTurnEnv(dataset=Dataset.from_list(vlmrl_vf_guess._rows(8, 0)),
                            eval_dataset=Dataset.from_list(vlmrl_vf_guess._rows(4, 1)),
                            rubric=vf.Rubric(funcs=[_zero]))


def test_episodes_play_concurrently_in_threads_and_from_inside_an_event_loop() -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    env = make_env("vlmrl-vf-guess", {})
    assert isinstance(env, VerifiersMultiTurnEnvironment)
    seeds = env.train_seeds(0, 8)
    answers = {s: _answer(env, s) for s in set(seeds)}

    def play(i: int) -> tuple[float, int]:
        seed = seeds[i]
        ep = env.reset(seed)
        for _ in range(i % 3):  # episode i is right on guess i % 3 + 1
            env.step(ep, "no")
        env.step(ep, answers[seed])
        return ep.reward, ep.turn

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(play, range(8)))
    assert results == [(pytest.approx(1.0 + 0.5 / (i % 3 + 1)), i % 3 + 1) for i in range(8)]

    async def main() -> list[tuple[float, int]]:  # the rollout client steps episodes from its loop's threads
        return list(await asyncio.gather(*(asyncio.to_thread(play, i) for i in range(4))))

    assert asyncio.run(main()) == results[:4]
    env.close()


class _StepRewards(vf.MultiTurnEnv):
    """Each env response adds a step reward of 0.25; the second one is final ("bye"); "boom" fails."""

    async def env_response(self, messages: vf.Messages, state: vf.State, **kwargs: Any) -> vf.Messages:
        state.add_step_reward(0.25)
        if messages[-1].content == "boom":
            raise vf.Error("boom")
        if len(state["trajectory"]) >= 2:
            state["final_env_response"] = [vf.UserMessage(content="bye")]
            return state["final_env_response"]
        return [vf.UserMessage(content=f"turn {len(state['trajectory'])} done")]


def _steps(state: vf.State) -> float:
    return state.total_step_reward()


def _said_bye(completion: vf.Messages) -> float:
    return float(completion[-1].content == "bye")


def test_step_rewards_a_final_env_response_and_errors_end_and_score_as_in_verifiers() -> None:
    ds = Dataset.from_list([{"question": "q", "answer": "a"}])
    env = VerifiersMultiTurnEnvironment(_StepRewards(dataset=ds, eval_dataset=ds,
                                                     rubric=vf.Rubric(funcs=[_steps, _said_bye])), "steps")
    assert env.max_turns == DEFAULT_MAX_TURNS  # verifiers' default max_turns is -1 (unbounded)
    ep = env.reset(0)
    assert _shape(ep.messages) == [("user", ["q"])]
    tr = env.step(ep, "a")
    assert not tr.done and tr.score.reward == 0.25 and tr.info == {"step_reward": 0.25}
    assert _shape(tr.observation or []) == [("user", ["turn 1 done"])]
    tr = env.step(ep, "b")
    # the rubric sees the final env response ("bye") but the model is not shown it
    assert tr.done and tr.info == {"step_reward": 0.25, "stop_condition": "has_final_env_response"}
    assert tr.score.parts == {"_steps": 0.5, "_said_bye": 1.0, "num_turns": 2.0}
    # a turn's reward is its step reward; the last turn carries the rest of the rubric's reward
    assert [t.score.reward for t in ep.transitions] == [0.25, 1.25] and ep.reward == pytest.approx(1.5)
    assert _shape(ep.messages) == [("user", ["q"]), ("assistant", ["a"]), ("user", ["turn 1 done"]),
                                   ("assistant", ["b"])]

    ep = env.reset(0)
    tr = env.step(ep, "boom")  # a vf.Error in env_response ends the rollout (has_error), which is scored
    assert tr.done and tr.info == {"step_reward": 0.25, "stop_condition": "has_error"}
    assert ep.reward == pytest.approx(0.25) and tr.score.parts["_said_bye"] == 0.0


def test_the_trainer_trains_two_steps_on_a_multi_turn_verifiers_environment(tiny_model_dir: Path,
                                                                            tmp_path: Path) -> None:
    from backend.rundir import RunDirectory, read_jsonl
    from tests.tinytrainer import tiny_cfg, tiny_trainer

    logs: list[str] = []
    cfg = tiny_cfg(max_steps=2, rollouts_per_step=4, batch_size=8, micro_batch_size=4, max_tokens=4, save_every=0)
    trainer = tiny_trainer(tiny_model_dir, cfg, run_dir=tmp_path)
    trainer.log = logs.append
    trainer.set_environment(make_env("vlmrl-vf-guess", {}))
    history = trainer.train()
    assert [h["step"] for h in history] == [1, 2] and all(h["num_rollouts"] == 8 for h in history)
    assert [line.split()[:2] for line in logs if line.startswith("step ")] == [["step", "1/2"], ["step", "2/2"]]
    rd = RunDirectory(tmp_path)
    assert [m["step"] for m in read_jsonl(rd.metrics)] == [1, 2]
    rollouts = list(read_jsonl(rd.rollouts))
    assert len(rollouts) == 2 * 8 and any(len(r["turns"]) > 1 for r in rollouts)
    for r in rollouts:
        turns = r["turns"]
        assert 1 <= len(turns) <= 3 and len(r["images"]) == len(turns)  # one image per guess
        assert all(t["reward"] == 0.0 for t in turns[:-1]) and "stop_condition" in turns[-1]["info"]
        parts = r["reward_parts"]
        assert {"correct", "quick", "num_turns"} <= parts.keys() and parts["num_turns"] == len(turns)
        assert r["reward"] == pytest.approx(parts["correct"] + 0.5 * parts["quick"])
        assert r["end_reason"] == ("max_turns" if len(turns) == 3 else "done")


def test_verifiers_environments_drive_our_server_and_train_on_what_it_sampled(tiny_model_dir: Path,
                                                                              tmp_path: Path) -> None:
    """The real verifiers library as the environment, our hf server sampling, the trainer
    stepping on the result: a single-turn env (prompts) and a multi-turn one (episodes)."""
    from backend.adapters import adapter_for
    from backend.models import load_model_and_processor
    from backend.rollout import RolloutClient
    from backend.sampling import banned_token_ids
    from backend.trainer import MultimodalGRPOTrainer
    from tests.serverproc import serving
    from tests.tinytrainer import tiny_cfg

    model, processor = load_model_and_processor(str(tiny_model_dir))
    single, game = make_env("vlmrl-vf-colors", {}), make_env("vlmrl-vf-guess", {})
    with serving(tmp_path, None, max_model_len=2048, limit_mm_per_prompt={"image": 4}) as server, \
            RolloutClient(server.url, banned_ids=banned_token_ids(processor.tokenizer)) as client:
        prompts = client.collect(single, single.train_examples(1, 2), 4, max_tokens=4, step=1)
        episodes = client.collect_episodes(game, game.train_seeds(1, 2), 4, max_tokens=4, step=1, max_context=2048)
    assert len(prompts) == 8 and all({"exact_answer", "one_word"} <= r.reward_parts.keys() for r in prompts)
    assert len(episodes) == 8 and [r.group for r in episodes] == [0] * 4 + [1] * 4
    for ep in episodes:
        assert 1 <= len(ep.turns) <= 3 and len(ep.images) == len(ep.turns)  # a new image each turn
        assert ep.turns[-1].reward_parts.keys() >= {"correct", "quick"}  # the rubric scored the end
        assert ep.reward == pytest.approx(sum(t.reward for t in ep.turns))
    for rollouts in (prompts, episodes):
        for r in rollouts[::2]:  # rewards that differ within every group, so both batches train
            r.reward += 1.0
        tr = MultimodalGRPOTrainer(model, processor, adapter_for(model.config, processor=processor, max_length=2048),
                                   tiny_cfg(), log=lambda s: None)
        m = tr.train_step(rollouts)
        assert m["dropped"] == 0 and m["num_rollouts"] == 8 and m["trained_sequences"] > 0 and m["grad_norm"] > 0
