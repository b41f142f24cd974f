"""The trainer in-process (no server): step math, run directory, checkpoints, resume helpers."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from backend.adapters import MultimodalAdapter, MultimodalBatch, adapter_for
from backend.config import validate_config
from backend.errors import ConfigError
from backend.evaluate import InProcessRolloutSource
from backend.rollout_types import Rollout
from backend.rundir import RunDirectory, read_jsonl
from backend.train import check_resumable, run_identity, truncate_jsonl_after
from backend.checkpoint import read_trainer_state
from backend.records import TrainerState
from backend.trainer import MultimodalGRPOTrainer
from environments import make_env
from backend.records import PHASES, TRAIN_PHASES
from tests.tinytrainer import load_tiny, tiny_cfg, tiny_trainer

METRIC_KEYS = {
    "step", "reward_mean", "reward_std", "loss", "ir", "ir_min", "ir_max", "entropy", "kl", "mismatch_kl",
    "clip_frac", "masked_frac", "grad_norm", "lr", "tokens_per_s", "rollout_s", "train_s", "sync_s", "step_s",
    "num_rollouts", "dropped", "time", "batch_s", "forward_backward_s", "optimizer_s", "write_s",
}


_load = load_tiny
_cfg = tiny_cfg
_trainer = tiny_trainer


class RecordingSync:
    def __init__(self) -> None:
        self.versions: list[int] = []
        self.names: list[str] = []

    def sync(self, named_tensors: Any, version: int) -> None:
        self.names = [n for n, _ in named_tensors]
        self.versions.append(version)

    def reconnect(self, timeout_s: float | None = None) -> None:
        raise AssertionError("no sync fails here: nothing to re-join")


def _fixed_rollouts(trainer: MultimodalGRPOTrainer, step: int = 1) -> list[Rollout]:
    cfg = trainer.config
    env = trainer.env
    assert env is not None
    return trainer.rollout_source.collect(env, env.train_examples(step, cfg.prompts_per_step), cfg.rollouts_per_step,
                                          temperature=1.0, top_p=1.0, max_tokens=4, step=step, seed=step)


def _with_mixed_rewards(rollouts: list[Rollout]) -> list[Rollout]:
    for i, r in enumerate(rollouts):  # make every group informative, whatever was sampled
        r.reward = float(i % 2)
    return rollouts


def test_train_step_is_on_policy_and_changes_the_weights(tiny_model_dir: Path) -> None:
    tr = _trainer(tiny_model_dir, _cfg())
    rollouts = _with_mixed_rewards(_fixed_rollouts(tr))
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.train_step(rollouts)
    assert m["ir"] == pytest.approx(1.0, abs=1e-4) and m["mismatch_kl"] == pytest.approx(0.0, abs=1e-6)
    assert m["clip_frac"] == 0 and m["masked_frac"] == 0
    assert m["grad_norm"] > 0 and m["num_rollouts"] == 8 and m["dropped"] == 0 and m["entropy"] > 0
    changed = [n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])]
    assert any("visual" in n for n in changed) and any("lm_head" in n for n in changed)
    assert tr.step == 1


def _step_capturing_grads(tr: MultimodalGRPOTrainer, rollouts: list[Rollout]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``tr.train_step(rollouts)`` and the gradients it clipped and applied."""
    captured: dict[str, torch.Tensor] = {}
    orig = torch.nn.utils.clip_grad_norm_

    def capture(params: Any, max_norm: float) -> Any:
        for n, p in tr.model.named_parameters():
            if p.grad is not None:
                captured[n] = p.grad.detach().clone()
        return orig(params, max_norm)

    torch.nn.utils.clip_grad_norm_ = capture  # type: ignore[assignment]
    try:
        return tr.train_step(rollouts), captured
    finally:
        torch.nn.utils.clip_grad_norm_ = orig  # type: ignore[assignment]


def test_micro_batches_accumulate_to_the_full_batch_gradient(tiny_model_dir: Path) -> None:
    grads = []
    for mbs in (8, 3):
        tr = _trainer(tiny_model_dir, _cfg(micro_batch_size=mbs))
        m, captured = _step_capturing_grads(tr, _with_mixed_rewards(_fixed_rollouts(tr)))
        grads.append((captured, m["loss"]))
    (g8, loss8), (g3, loss3) = grads
    assert loss8 == pytest.approx(loss3, abs=1e-6)
    assert g8.keys() == g3.keys()
    for n in g8:
        assert torch.allclose(g8[n], g3[n], atol=1e-6), n


class PlainAdapter(MultimodalAdapter):
    """A user-written adapter (not a ProcessorAdapter): the trainer forwards every sequence."""

    def __init__(self, inner: MultimodalAdapter) -> None:
        self.inner = inner

    def build_batch(self, rollouts: Sequence[Rollout]) -> MultimodalBatch:
        return self.inner.build_batch(rollouts)


def test_skipping_zero_advantage_sequences_gives_the_full_batch_update(tiny_model_dir: Path) -> None:
    runs = []
    for plain in (False, True):
        tr = _trainer(tiny_model_dir, _cfg(micro_batch_size=3))
        if plain:
            tr.adapter = PlainAdapter(tr.adapter)
        steps = []
        for step in (1, 2):
            rollouts = _fixed_rollouts(tr, step)
            for r in rollouts:  # group 0 informative at step 1 only; every other group all-zero
                r.reward = float(step == 1 and r.group == 0 and r.index % 2 == 0)
            before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
            m, grads = _step_capturing_grads(tr, rollouts)
            moved = sum(not torch.equal(p, before[n]) for n, p in tr.model.named_parameters())
            steps.append((m, grads, moved))
        runs.append(steps)
    skip, full = runs
    assert skip[0][0]["trained_sequences"] == 4 and full[0][0]["trained_sequences"] == 8
    assert skip[1][0]["trained_sequences"] == 0  # nothing forwarded at step 2 ...
    assert skip[1][2] == full[1][2] > 0  # ... yet AdamW's momentum moves the same parameters
    for (sm, sg, _), (fm, fg, _) in zip(skip, full):
        assert sm["loss"] == pytest.approx(fm["loss"], abs=1e-6)
        assert sm["loss_tokens"] == fm["loss_tokens"]
        assert sg.keys() == fg.keys()
        for n in sg:
            assert torch.allclose(sg[n], fg[n], atol=1e-7), n


def test_train_writes_metrics_rollouts_images_and_checkpoints(tiny_model_dir: Path, tmp_path: Path) -> None:
    sync = RecordingSync()
    lines: list[str] = []
    cfg = _cfg(max_steps=4, save_every=2, sync_to_vllm_every=2)
    model, processor = _load(tiny_model_dir)
    tr = MultimodalGRPOTrainer(model, processor, adapter_for(model.config, processor=processor), cfg,
                               env=make_env("colors", {}), weight_sync=sync, run_dir=tmp_path, log=lines.append)
    history = tr.train()
    rd = RunDirectory(tmp_path)
    metrics = list(read_jsonl(rd.metrics))
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] == [h["step"] for h in history]
    for m in metrics:
        assert METRIC_KEYS <= m.keys(), METRIC_KEYS - m.keys()
        # where the step's time went adds up to it; the train phases to the training time
        assert m["step_s"] == pytest.approx(sum(m[k] for k in PHASES), abs=1e-6)
        inner = sum(m[k] for k in TRAIN_PHASES)
        assert all(m[k] >= 0 for k in (*PHASES, *TRAIN_PHASES)) and 0.8 * m["train_s"] <= inner <= m["train_s"]
        if m["step"] % 2:  # synced every 2 steps: nothing to count in between
            assert m["sync_s"] < 1e-3
    assert sync.versions == [2, 4]
    assert "model.visual.patch_embed.proj.weight" in sync.names and "lm_head.weight" in sync.names
    rollouts = list(read_jsonl(rd.rollouts))
    assert len(rollouts) == 4 * 8
    r0 = rollouts[0]
    assert {"step", "prompt", "completion", "reward", "reward_parts", "advantage", "images"} <= r0.keys()
    assert "colour" in r0["prompt"] and r0["images"] and (tmp_path / r0["images"][0]).is_file()
    assert r0["images"][0].startswith("rollouts/1/")
    assert sorted(int(p.name) for p in rd.checkpoints_dir.iterdir()) == [2, 4]
    assert rd.latest_checkpoint() == rd.checkpoint(4)
    for f in ("COMPLETE", "optimizer.pt", "rng.pt", "trainer_state.json", "config.json"):
        assert (rd.checkpoint(4) / f).exists(), f
    progress = [ln for ln in lines if ln.startswith("step ")]
    assert len(progress) == 4
    import re

    assert re.fullmatch(r"step 4/4 reward=\d\.\d\d loss=-?\d+\.\d{3} ir=(\d\.\d\d|-) ent=(\d+\.\d\d|-) kl=(\d\.\d{3}|-) "
                        r"\d+\.\d\ds/it", progress[-1]), progress[-1]


def test_checkpoint_round_trip_restores_weights_optimizer_rng_and_step(tiny_model_dir: Path, tmp_path: Path) -> None:
    tr = _trainer(tiny_model_dir, _cfg(max_steps=2), run_dir=tmp_path)
    tr.train()
    ckpt = RunDirectory(tmp_path).latest_checkpoint()
    assert ckpt is not None and read_trainer_state(ckpt).step == 2
    tr2 = _trainer(tiny_model_dir, _cfg(max_steps=2))
    assert tr2.load_checkpoint(ckpt) == 2
    for (n, a), (_, b) in zip(tr.model.named_parameters(), tr2.model.named_parameters()):
        assert torch.equal(a, b), n
    s1, s2 = tr.optimizer.state_dict()["state"], tr2.optimizer.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert tr2.scheduler.last_epoch == tr.scheduler.last_epoch
    a = torch.rand(3)  # the RNG continues from the checkpoint's state
    torch.manual_seed(1234)
    tr2.load_checkpoint(ckpt)
    assert torch.equal(torch.rand(3), a)


def test_an_incomplete_checkpoint_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    tr = _trainer(tiny_model_dir, _cfg())
    (tmp_path / "5").mkdir()
    with pytest.raises(FileNotFoundError):
        tr.load_checkpoint(tmp_path / "5")


class DroppingSource:
    """Wraps a source and empties one completion per step."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.shares_model = inner.shares_model

    def collect(self, env: Any, examples: Sequence[Any], n: int, **kw: Any) -> list[Rollout]:
        rs = self.inner.collect(env, examples, n, **kw)
        rs[0].completion_ids, rs[0].behavior_logprobs = [], []
        return rs


def test_bad_rollouts_are_dropped_and_counted(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    model, processor = _load(tiny_model_dir)
    src = DroppingSource(InProcessRolloutSource(model, processor))
    tr = MultimodalGRPOTrainer(model, processor, adapter_for(model.config, processor=processor), _cfg(max_steps=1),
                               env=make_env("colors", {}), rollout_source=src, log=lambda s: None)
    with caplog.at_level("WARNING", logger="vlmrl.adapters"):
        (m,) = tr.train()
    assert m["dropped"] == 1 and m["num_rollouts"] == 8
    assert "train-1-0" in caplog.text and "empty completion" in caplog.text


def test_kl_to_the_reference_is_zero_before_the_first_update(tiny_model_dir: Path) -> None:
    tr = _trainer(tiny_model_dir, _cfg(beta=0.05))
    assert tr.ref_model is not None and tr.ref_model is not tr.model
    m = tr.train_step(_with_mixed_rewards(_fixed_rollouts(tr)))
    assert m["kl"] == pytest.approx(0.0, abs=1e-7)
    m2 = tr.train_step(_with_mixed_rewards(_fixed_rollouts(tr, step=2)))
    assert m2["kl"] > 0


def test_warmup_ramps_the_learning_rate(tiny_model_dir: Path) -> None:
    tr = _trainer(tiny_model_dir, _cfg(warmup_steps=4, learning_rate=1e-3))
    lrs = [tr.train_step(_fixed_rollouts(tr, step=s))["lr"] for s in (1, 2, 3, 4, 5)]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_lr_schedules_after_warmup() -> None:
    from backend.optim import lr_factor

    lin = [lr_factor(s, warmup=2, total=6, kind="linear") for s in range(6)]
    assert lin == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cos = [lr_factor(s, warmup=0, total=4, kind="cosine") for s in range(5)]
    assert cos == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466, 0.0])
    assert [lr_factor(s, warmup=0, total=3, kind="constant") for s in range(3)] == [1.0, 1.0, 1.0]
    assert lr_factor(10, warmup=0, total=4, kind="linear") == 0.0  # resumed past max_steps: no negative lr
    with pytest.raises(ValueError, match="unknown lr_scheduler_type"):
        lr_factor(0, warmup=0, total=4, kind="step")


def test_linear_decay_reaches_the_trainer(tiny_model_dir: Path) -> None:
    tr = _trainer(tiny_model_dir, _cfg(learning_rate=1e-3, max_steps=4, lr_scheduler_type="linear"))
    lrs = [tr.train_step(_fixed_rollouts(tr, step=s))["lr"] for s in (1, 2, 3)]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4])


# --- resume helpers ---------------------------------------------------------------------------


def test_truncate_jsonl_after_keeps_earlier_steps_and_drops_partial_lines(tmp_path: Path) -> None:
    f = tmp_path / "metrics.jsonl"
    f.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 7)) + '{"step": 7, "los')
    assert truncate_jsonl_after(f, 4) == 3
    assert [r["step"] for r in read_jsonl(f)] == [1, 2, 3, 4]
    assert truncate_jsonl_after(f, 4) == 0


def _vcfg(**args: Any) -> Any:
    return validate_config({"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"},
                            "trainer": {"args": {"max_steps": 10, **args}}})


def test_resume_accepts_more_steps_but_not_another_learning_rate() -> None:
    saved = TrainerState(step=5, identity=run_identity(_vcfg()))
    check_resumable(saved, _vcfg(max_steps=50, save_every=5), Path("ckpt"))
    with pytest.raises(ConfigError, match="trainer.args.learning_rate"):
        check_resumable(saved, _vcfg(learning_rate=1e-3), Path("ckpt"))


def test_eval_every_scores_the_held_out_split_and_appends_eval_lines(tiny_model_dir: Path, tmp_path: Path) -> None:
    from backend.records import EvalRecord

    tr = _trainer(tiny_model_dir, _cfg(max_steps=2, eval_every=1, eval_size=6, save_every=0), run_dir=tmp_path)
    tr.train()
    lines = [EvalRecord.from_json(d) for d in read_jsonl(tmp_path / "eval.jsonl")]
    assert [e.step for e in lines if e] == [1, 2]
    for e in lines:
        assert e is not None and e.n == 6 and 0.0 <= e.accuracy <= 1.0 and e.std is not None
        assert set(e.parts) == {"correct", "is_color"}


class ReplaySource:
    """A remote-like source (it does not share the trainer's model): replays prepared rollouts."""

    shares_model = False

    def __init__(self, by_step: dict[int, list[Rollout]], events: list[str]) -> None:
        self.by_step = by_step
        self.events = events
        self.asked = {s: threading.Event() for s in by_step}

    def collect(self, env: Any, examples: Sequence[Any], n: int, *, step: int, **kw: Any) -> list[Rollout]:
        self.events.append(f"collect {step}")
        self.asked[step].set()
        return self.by_step[step]


@pytest.mark.parametrize("async_level", [1, 0])
def test_with_a_server_the_next_rollouts_are_requested_while_the_step_trains(
    tiny_model_dir: Path, async_level: int
) -> None:
    tr = _trainer(tiny_model_dir, _cfg(max_steps=3, async_level=async_level))
    by_step = {s: _with_mixed_rewards(_fixed_rollouts(tr, s)) for s in (1, 2, 3)}
    events: list[str] = []
    source = ReplaySource(by_step, events)
    tr.rollout_source = source
    inner = tr.train_step

    def train_step(rollouts: list[Rollout]) -> dict[str, Any]:
        nxt = rollouts[0].step + 1
        if async_level and nxt in source.asked:  # the rollout thread asks while this step trains
            assert source.asked[nxt].wait(60), f"step {nxt}'s rollouts were not asked for during step {nxt - 1}"
        # without async the main thread alone collects: the order is the code's, nothing to wait for
        out = inner(rollouts)
        events.append(f"trained {rollouts[0].step}")
        return out

    tr.train_step = train_step  # type: ignore[method-assign]
    tr.train()
    if async_level:
        assert events == ["collect 1", "collect 2", "trained 1", "collect 3", "trained 2", "trained 3"]
    else:
        assert events == ["collect 1", "trained 1", "collect 2", "trained 2", "collect 3", "trained 3"]


def test_alone_the_trainer_pushes_its_weights_while_it_waits_for_the_next_rollouts(
        tiny_model_dir: Path, tmp_path: Path) -> None:
    """Step k's push runs off the training thread (overlapping the wait for step k+1's
    rollouts), and is over before anything depends on it: the rollouts of step k+2 are asked
    for, and step k+1 trains, only after it; the last step's push is done when train() returns."""
    import httpx

    from backend import contract
    from backend.weight_sync import WeightSyncClient
    from tests.serverproc import serving

    events: list[str] = []
    with serving(tmp_path, "tok") as srv:
        client = WeightSyncClient(srv.url, "tok", backend="gloo", timeout_s=60)
        tr = _trainer(tiny_model_dir, _cfg(max_steps=4, async_level=1), weight_sync=client)
        by_step = {s: _with_mixed_rewards(_fixed_rollouts(tr, s)) for s in (1, 2, 3, 4)}
        tr.rollout_source = ReplaySource(by_step, events)
        inner_sync, inner_step = client.sync, tr.train_step

        def sync(named: Any, version: int, **kw: Any) -> Any:
            events.append(f"push {version} on {threading.current_thread().name}")
            out = inner_sync(named, version, **kw)
            events.append(f"pushed {version}")
            return out

        def train_step(rollouts: list[Rollout]) -> dict[str, Any]:
            events.append(f"train {rollouts[0].step}")
            return inner_step(rollouts)

        client.sync = sync  # type: ignore[method-assign]
        tr.train_step = train_step  # type: ignore[method-assign]
        try:
            history = tr.train()
        finally:
            client.close()
        info = httpx.get(srv.url + contract.ROUTE_WEIGHT_INFO,
                         headers={contract.TOKEN_HEADER: "Bearer tok"}).json()
    pushes = [e for e in events if e.startswith("push ")]
    assert pushes == ["push 1 on weight-push", "push 2 on weight-push", "push 3 on weight-push",
                      f"push 4 on {threading.main_thread().name}"], events
    for k in (1, 2, 3):
        done = events.index(f"pushed {k}")
        assert done < events.index(f"train {k + 1}"), events  # the weights change only after the push
        if k + 2 <= 4:
            assert done < events.index(f"collect {k + 2}"), events  # step k+2 samples from weights k
    assert info["weight_version"] == 4
    for m in history:  # the accounting still adds up, the push counted where the trainer waited for it
        assert sum(m[p] for p in PHASES) == pytest.approx(m["step_s"], abs=1e-6)
