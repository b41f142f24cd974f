"""Multi-turn episodes end to end: Crafter through the real server, one sequence per episode
in the trainer (model turns placed where they were generated, loss only on them, behaviour
logprobs aligned), cuts at turn boundaries, per-seed groups, records with per-turn parts."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from PIL import Image

from backend.adapters import adapter_for
from backend.logprobs import token_logprobs
from backend.records import RolloutRecord
from backend.rollout import RolloutClient, next_prompt_estimate
from backend.rollout_types import Rollout, Turn
from backend.rollout_writer import RolloutWriter
from backend.rundir import RunDirectory
from backend.sampling import banned_token_ids, bias_vector
from environments import make_env
from environments.base import Episode, MultiTurnEnvironment, Score, Transition
from tests.serverproc import ServerProc, load_trainer_side, serving
from tests.tinytrainer import tiny_cfg

pytest.importorskip("crafter")

TURNS = 3


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    with serving(tmp_path_factory.mktemp("episode-server"), None, max_model_len=4096,
                 limit_mm_per_prompt={"image": 8}) as proc:
        yield proc


@pytest.fixture(scope="module")
def trainer_side(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_trainer_side(tiny_model_dir)


@pytest.fixture(scope="module")
def crafter_episodes(server: ServerProc,
                     trainer_side: tuple[Any, Any]) -> Iterator[tuple[list[Rollout], RolloutClient]]:
    _, processor = trainer_side
    env = make_env("crafter", {"episode_length": TURNS, "size": 64})
    with RolloutClient(server.url, banned_ids=banned_token_ids(processor.tokenizer), max_concurrent=4) as client:
        seeds = env.train_seeds(1, 2)
        yield client.collect_episodes(env, seeds, 2, temperature=1.0, max_tokens=6, step=1, max_context=4096), client


def _image_tokens(processor: Any, img: Image.Image) -> int:
    enc = processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[[img]], return_tensors="pt")
    return int((enc["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum())


def test_a_crafter_episode_through_the_server_keeps_every_frame_and_aligns_every_turn(
        crafter_episodes: tuple[list[Rollout], RolloutClient], trainer_side: tuple[Any, Any]) -> None:
    rollouts, client = crafter_episodes
    model, processor = trainer_side
    assert [r.group for r in rollouts] == [0, 0, 1, 1] and [r.index for r in rollouts] == [0, 1, 2, 3]
    assert rollouts[0].example_id == rollouts[1].example_id != rollouts[2].example_id  # a group = one seed
    per_frame = _image_tokens(processor, rollouts[0].images[0])
    assert per_frame > 0
    adapter = adapter_for(model.config, processor=processor, max_length=4096)
    for r in rollouts:
        r.advantage = 1.0
    batch = adapter.build_batch(rollouts)
    assert batch.dropped == [] and len(batch) == 4
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for b, r in enumerate(rollouts):
        assert len(r.turns) == TURNS and r.end_reason == "max_turns"
        assert len(r.images) == TURNS  # one frame per turn, all kept in the conversation
        assert [m["role"] for m in r.messages] == ["system"] + ["user", "assistant"] * TURNS
        # every turn's prompt holds one more frame: the server counted its image tokens
        counts = [t.prompt_tokens for t in r.turns]
        assert all(c is not None for c in counts)
        enc = adapter.encode_episode(r)[1]
        assert enc.spans is not None and len(enc.spans) == TURNS
        for k, t in enumerate(r.turns):
            # the server's prompt of turn k is exactly the trainer's sequence before turn k's ids
            assert t.prompt_tokens == enc.spans[k][0], (k, t.prompt_tokens, enc.spans)
            if k:
                assert t.prompt_tokens - r.turns[k - 1].prompt_tokens >= per_frame + len(r.turns[k - 1].completion_ids)
        n_img = int((batch.input_ids[b] == image_pad).sum())
        assert n_img == TURNS * per_frame
        # the loss mask covers exactly the server's ids of every turn, never an observation
        mask = batch.loss_mask[b] > 0
        assert batch.input_ids[b][mask].tolist() == r.completion_ids == [i for t in r.turns for i in t.completion_ids]
        assert not (mask & (batch.input_ids[b] == image_pad)).any()
        assert batch.behavior_logprobs[b][mask].tolist() == pytest.approx(r.behavior_logprobs)
        # per-turn reward parts sum to the episode's
        assert r.reward == pytest.approx(sum(t.reward for t in r.turns))
        for part, total in r.reward_parts.items():
            assert total == pytest.approx(sum(t.reward_parts.get(part, 0.0) for t in r.turns))
        assert all(t.info["action"] for t in r.turns)
        assert "achievement/collect_wood" in r.summary
    # the trainer's logprobs of every model turn, on its own sequence, equal the server's
    bias = bias_vector(client.logit_bias, model.get_output_embeddings().weight.shape[0])
    with torch.no_grad():
        lp, _ = token_logprobs(model, adapter, batch, temperature=1.0, bias=bias)
    mask = batch.loss_mask > 0
    torch.testing.assert_close(lp[mask], batch.behavior_logprobs[mask], atol=2e-4, rtol=0)


def test_episode_records_keep_each_turn_with_its_frame(crafter_episodes: tuple[list[Rollout], RolloutClient],
                                                       tmp_path: Path) -> None:
    rollouts, _ = crafter_episodes
    rd = RunDirectory(tmp_path)
    w = RolloutWriter(rd)
    w.write(1, rollouts)
    w.close()
    lines = [json.loads(x) for x in rd.rollouts.read_text().splitlines()]
    assert len(lines) == 4
    recs = [RolloutRecord.from_json(d) for d in lines]
    for r, rec in zip(rollouts, recs):
        assert len(rec.turns) == TURNS and rec.end_reason == "max_turns"
        assert len(rec.images) == TURNS and len(set(rec.images)) == TURNS
        assert [t.images for t in rec.turns] == [[p] for p in rec.images]  # turn k saw frame k
        for k, t in enumerate(rec.turns):
            assert (tmp_path / t.images[0]).is_file()
            assert t.reward_parts == r.turns[k].reward_parts and t.info["action"] == r.turns[k].info["action"]
            assert t.completion_tokens == len(r.turns[k].completion_ids)
        assert rec.prompt.count("<image>") == 1  # the first prompt, not the whole conversation
        assert rec.summary == r.summary
    # two episodes of one seed keep their own frames
    assert set(recs[0].images).isdisjoint(recs[1].images)


class Lengths(MultiTurnEnvironment):
    """A toy game with images whose reward varies with the reply: 1 point for an odd number of
    characters (the tiny model says colour names: red 3, blue 4, green 5, ...)."""

    id = "lengths"

    def __init__(self, max_turns: int = 3) -> None:
        self.max_turns = max_turns

    def train_seeds(self, step: int, n: int) -> list[int]:
        return [step * 10 + i for i in range(n)]

    def eval_seeds(self, n: int) -> list[int]:
        return [10_000 + i for i in range(n)]

    def system_prompt(self) -> str | None:
        return "Say a colour."

    def _obs(self, k: int) -> list[dict[str, Any]]:
        img = Image.new("RGB", (64, 64), ((40 * k) % 256, 90, 200))
        return [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": f"turn {k}"}]}]

    def new_game(self, seed: int) -> tuple[Any, list[dict[str, Any]]]:
        return {"k": 0}, self._obs(0)

    def play(self, episode: Episode, reply: str) -> Transition:
        episode.game["k"] += 1
        r = float(len(reply) % 2)
        return Transition(self._obs(episode.game["k"]), Score(r, {"odd": r}), False, {"reply": reply})

    def truncated(self, episode: Episode) -> Score | None:
        return Score(0.5, {"partial": 0.5})


def test_overlong_episodes_are_cut_after_the_last_turn_that_fits(
        crafter_episodes: tuple[list[Rollout], RolloutClient], trainer_side: tuple[Any, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    rollouts, _ = crafter_episodes
    model, processor = trainer_side
    r = rollouts[0]
    full = adapter_for(model.config, processor=processor, max_length=None).encode_episode(r)[1]
    assert full.spans is not None
    limit = full.spans[1][1] + 2  # room for two turns, not for the third turn's observation and ids
    adapter = adapter_for(model.config, processor=processor, max_length=limit)
    r.advantage = 0.5
    with caplog.at_level(logging.WARNING, "vlmrl.adapters"):
        kept, dropped = adapter.validate([r])
    assert dropped == [] and len(kept) == 1
    cut = kept[0]
    assert len(cut.turns) == 2 and cut.advantage == 0.5 and cut.end_reason and cut.end_reason.startswith("cut:")
    assert cut.completion_ids == r.turns[0].completion_ids + r.turns[1].completion_ids
    assert f"cut after turn 2 of {TURNS}" in caplog.text and "max_length" in caplog.text
    batch = adapter.build_batch(kept)
    n = int(batch.attention_mask[0].sum())
    assert n == full.spans[1][1]  # ends with turn 2's ids: never inside an observation
    assert batch.input_ids[0, :n].tolist() == full.input_ids[:n].tolist()
    # a first turn that does not fit drops the episode, with the reason
    tiny = adapter_for(model.config, processor=processor, max_length=full.spans[0][1] - 1)
    _, dropped = tiny.validate([r])
    assert len(dropped) == 1 and "first turn" in dropped[0].reason


def test_the_rollout_side_ends_an_episode_before_its_prompt_outgrows_the_context(server: ServerProc,
                                                                               trainer_side: tuple[Any, Any]) -> None:
    _, processor = trainer_side
    env = Lengths(max_turns=6)
    client = RolloutClient(server.url, banned_ids=banned_token_ids(processor.tokenizer), max_concurrent=2)
    try:
        (free,) = client.collect_episodes(env, [1], 1, max_tokens=4, max_context=4096)
        assert len(free.turns) == 6 and free.end_reason == "max_turns"
        counts = [t.prompt_tokens for t in free.turns]
        assert all(c is not None for c in counts)
        # a limit that the fourth turn's prompt would pass
        limit = counts[3] + 4 - 1
        (short,) = client.collect_episodes(env, [1], 1, max_tokens=4, max_context=limit)
        assert short.end_reason == "context" and 1 <= len(short.turns) <= 4
        assert all(t.prompt_tokens is not None and t.prompt_tokens + 4 <= limit for t in short.turns)
        # the environment scored the partial episode: added to the last turn, and to the episode
        assert short.turns[-1].reward_parts["partial"] == 0.5 and short.reward_parts["partial"] == 0.5
        assert "partial" not in free.reward_parts
        last = short.turns[-1]
        prev = short.turns[-2].prompt_tokens if len(short.turns) > 1 else None
        assert next_prompt_estimate(last.prompt_tokens, len(last.completion_ids), prev) + 4 > limit
    finally:
        client.close()


def test_the_trainer_trains_on_episodes_grouped_by_seed(tiny_model_dir: Path, tmp_path: Path) -> None:
    """In process (no server): episodes of a toy game whose reward varies train, loss on model turns."""
    from tests.tinytrainer import tiny_trainer

    cfg = tiny_cfg(max_steps=2, rollouts_per_step=4, batch_size=8, micro_batch_size=4, max_tokens=4,
                   temperature=1.5, save_every=0)
    trainer = tiny_trainer(tiny_model_dir, cfg, run_dir=tmp_path)
    trainer.set_environment(Lengths(max_turns=2))
    # in-process sampling draws from torch's generator: seeded, every run samples the same replies
    torch.manual_seed(0)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    history = trainer.train()
    assert len(history) == 2
    for m in history:
        assert m["num_rollouts"] == 8 and m["dropped"] == 0
        assert m["loss_tokens"] > 0
    assert any(m["trained_sequences"] > 0 for m in history)
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    recs = [RolloutRecord.from_json(json.loads(x)) for x in (tmp_path / "rollouts.jsonl").read_text().splitlines()]
    assert len(recs) == 16 and all(len(r.turns) == 2 for r in recs)
    for step in (1, 2):
        groups: dict[int, list[RolloutRecord]] = {}
        for r in recs:
            if r.step == step:
                groups.setdefault(r.group, []).append(r)
        assert len(groups) == 2
        for g in groups.values():
            assert len({r.example_id for r in g}) == 1  # one seed per group
            mean = sum(r.reward for r in g) / len(g)
            for r in g:  # the advantage has the sign of the episode's reward minus its group's mean
                assert r.advantage is not None
                assert r.advantage == pytest.approx(0.0, abs=1e-6) if abs(r.reward - mean) < 1e-6 else (
                    (r.advantage > 0) == (r.reward > mean))


def test_turn_and_rollout_records_round_trip() -> None:
    from backend.records import TurnRecord

    t = TurnRecord(completion="do", reward=1.0, reward_parts={"achievements": 1.0}, info={"action": "do",
                   "unlocked": ["collect_wood"], "odd": object()}, images=["rollouts/1/a-0.png"], prompt_tokens=12,
                   completion_tokens=2)
    rec = RolloutRecord(step=1, index=0, group=0, example_id="crafter-1", prompt="p", completion="do", reward=1.0,
                        turns=[t], end_reason="done", summary={"achievement/collect_wood": 1.0})
    d = json.loads(json.dumps(rec.to_json()))
    back = RolloutRecord.from_json(d)
    assert back.turns[0].info["unlocked"] == ["collect_wood"] and isinstance(back.turns[0].info["odd"], str)
    assert back.turns[0].images == t.images and back.end_reason == "done" and back.summary == rec.summary
    with pytest.raises(ValueError, match="turn field 'reward'"):
        RolloutRecord.from_json({**d, "turns": [{"completion": "x"}]})
    old = {k: v for k, v in d.items() if k not in ("turns", "end_reason", "summary")}  # a single-turn line
    assert RolloutRecord.from_json(old).turns == []


def test_turns_must_carry_one_logprob_per_id() -> None:
    with pytest.raises(ValueError, match="2 completion ids but 1 logprobs"):
        Turn(prompt_end=1, completion="x", completion_ids=[1, 2], behavior_logprobs=[0.0])
