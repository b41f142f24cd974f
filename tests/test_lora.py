"""LoRA (peft) and ``freeze_vision`` in the trainer: real tiny models, real peft, real steps."""

from __future__ import annotations

import functools
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("peft")

from backend import records
from backend.config import LoraSettings, validate_config
from backend.errors import ConfigError
from backend.lora import apply_lora, dropout_modules, merged_model, merged_weights, vision_tower
from backend.rollout_types import Rollout
from backend.train import check_resumable, run_identity
from backend.trainer import MultimodalGRPOTrainer
from tests.tinytrainer import load_tiny, tiny_cfg, tiny_trainer

LORA = {"r": 8, "alpha": 16}


_load = load_tiny
_cfg = functools.partial(tiny_cfg, learning_rate=3e-3)
_trainer = tiny_trainer


def _rollouts(tr: MultimodalGRPOTrainer, step: int = 1) -> list[Rollout]:
    env, cfg = tr.env, tr.config
    assert env is not None
    out = tr.rollout_source.collect(env, env.train_examples(step, cfg.prompts_per_step), cfg.rollouts_per_step,
                                    temperature=1.0, top_p=1.0, max_tokens=4, step=step, seed=step)
    for i, r in enumerate(out):  # every group informative, whatever was sampled
        r.reward = float(i % 2)
    return out


class RecordingSync:
    def __init__(self) -> None:
        self.sent: list[tuple[str, torch.Tensor]] = []

    def sync(self, named_tensors: Any, version: int, dtype: torch.dtype | None = None) -> None:
        self.sent = [(n, t.clone()) for n, t in named_tensors]

    def reconnect(self, timeout_s: float | None = None) -> None:
        raise AssertionError("no sync fails here")


def test_lora_config_validates_and_bad_tables_name_the_key() -> None:
    base = {"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"}}
    cfg = validate_config({**base, "trainer": {"args": {"lora": LORA}}})
    assert cfg.trainer.args.lora == LoraSettings(r=8, alpha=16)
    assert "language_model" in str(cfg.trainer.args.lora.target_modules)
    assert validate_config(base).trainer.args.lora is None
    for bad, key in (({"r": 0}, "trainer.args.lora.r"), ({"r": 8, "rank": 8}, "trainer.args.lora.rank"),
                     ({"dropout": 1.0}, "trainer.args.lora.dropout"), ({"alpha": -1}, "trainer.args.lora.alpha")):
        with pytest.raises(ConfigError) as e:
            validate_config({**base, "trainer": {"args": {"lora": bad}}})
        assert e.value.key == key and "\n" not in str(e.value)


def test_lora_step_changes_only_adapters_and_syncs_merged_base_weights(tiny_model_dir: Path) -> None:
    sync = RecordingSync()
    tr = _trainer(tiny_model_dir, _cfg(lora=LORA), weight_sync=sync)
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(p.numel() for p in tr.params) == sum(p.numel() for n, p in tr.model.named_parameters() if n in trainable)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.train_step(_rollouts(tr))  # rollouts sampled through the peft model's generate
    assert m["grad_norm"] > 0 and m["ir"] == pytest.approx(1.0, abs=1e-4)
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable  # every base weight bit-identical
    assert any(".lora_B." in n for n in changed)  # B starts at zero: the update is not a no-op

    tr.sync_weights()
    sent = dict(sync.sent)
    merged = copy.deepcopy(tr.model).merge_and_unload().state_dict()
    base_model, _ = _load(tiny_model_dir)
    base = dict(base_model.named_parameters())
    assert set(sent) <= set(base) and set(sent) <= set(merged)
    assert len(sent) == 7 * base_model.config.text_config.num_hidden_layers  # q k v o gate up down
    assert all(n.startswith("model.language_model.") and n.endswith("_proj.weight") for n in sent)
    for n, t in sent.items():
        assert t.shape == base[n].shape and t.dtype == base[n].dtype
        assert torch.equal(t, merged[n]), n
    assert any(not torch.equal(sent[n], base[n]) for n in sent)  # the update reaches the server


def test_lora_checkpoint_holds_the_adapter_and_resume_restores_it_and_the_optimizer(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    cfg = _cfg(lora=LORA)
    tr = _trainer(tiny_model_dir, cfg, run_dir=tmp_path / "run")
    tr.train_step(_rollouts(tr))
    path = tr.save_checkpoint()
    assert (path / "adapter_model.safetensors").exists() and (path / "adapter_config.json").exists()
    assert (path / records.CHECKPOINT_MARKER).exists() and not (path / "model.safetensors").exists()
    assert not list(path.parent.glob(".*.tmp"))

    merged_then = dict(merged_weights(tr.model))
    evaluated = merged_model(_load(tiny_model_dir)[0], path).state_dict()  # what `vlmrl eval --checkpoint` loads
    for n, t in merged_then.items():
        assert torch.allclose(evaluated[n], t, atol=1e-6), n

    again = _trainer(tiny_model_dir, cfg)
    assert again.load_checkpoint(path) == 1
    saved = dict(tr.model.named_parameters())
    for n, p in again.model.named_parameters():
        assert torch.equal(p, saved[n]), n
    s0, s1 = tr.optimizer.state_dict()["state"], again.optimizer.state_dict()["state"]
    assert s0.keys() == s1.keys() and s0
    for k in s0:
        assert torch.equal(s0[k]["exp_avg"], s1[k]["exp_avg"]) and torch.equal(s0[k]["exp_avg_sq"], s1[k]["exp_avg_sq"])
    # the next step is the same from the original and the restored trainer
    rollouts = _rollouts(tr, step=2)
    tr.train_step(copy.deepcopy(rollouts))
    again.train_step(copy.deepcopy(rollouts))
    for n, p in again.model.named_parameters():
        assert torch.allclose(p, saved[n], atol=1e-7), n

    full = _trainer(tiny_model_dir, _cfg())  # a LoRA checkpoint is no full-model checkpoint
    with pytest.raises(RuntimeError, match="unexpected"):
        full.load_checkpoint(path)


def test_eval_serves_a_lora_checkpoint_as_the_base_with_the_adapter_merged(tmp_path: Path,
                                                                           tiny_model_dir: Path) -> None:
    from backend.errors import ModelError
    from backend.evaluate import eval_model_source
    from backend.lora import merged_model
    from backend.models import load_model_and_processor

    tr = _trainer(tiny_model_dir, _cfg(lora=LORA), run_dir=tmp_path / "run")
    tr.train_step(_rollouts(tr))
    path = tr.save_checkpoint()
    cfg = validate_config({"model": str(tiny_model_dir), "env": {"id": "colors"},
                           "trainer": {"args": {"max_tokens": 4, "lora": LORA}}})
    served = eval_model_source(cfg, path, tmp_path / "merged")
    assert served == str(tmp_path / "merged")
    got = load_model_and_processor(served)[0].state_dict()
    want = merged_model(_load(tiny_model_dir)[0], path).state_dict()
    assert set(got) == set(want)
    changed = [n for n in want if not torch.equal(want[n], _load(tiny_model_dir)[0].state_dict()[n])]
    assert changed, "the adapter changed nothing"
    for n, t in want.items():
        assert torch.allclose(got[n], t, atol=1e-6), n
    assert eval_model_source(cfg, None, tmp_path / "unused") == str(tiny_model_dir)
    with pytest.raises(ModelError, match="neither a model"):
        eval_model_source(cfg, tmp_path, tmp_path / "x")


def test_resume_with_other_lora_settings_is_refused(tmp_path: Path) -> None:
    base = {"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"}}
    then = validate_config({**base, "trainer": {"args": {"lora": LORA}}})
    state = records.TrainerState(3, {}, run_identity(then))
    check_resumable(state, then, tmp_path)
    for other in ({"lora": {**LORA, "r": 4}}, {}, {"lora": LORA, "freeze_vision": True}):
        with pytest.raises(ConfigError, match="resume needs the same config") as e:
            check_resumable(state, validate_config({**base, "trainer": {"args": other}}), tmp_path)
        assert e.value.key in ("trainer.args.lora", "trainer.args.freeze_vision")


def test_freeze_vision_in_full_fine_tuning_trains_everything_but_the_tower(tiny_model_dir: Path) -> None:
    tr = _trainer(tiny_model_dir, _cfg(freeze_vision=True))
    tower = {id(p) for p in vision_tower(tr.model).parameters()}  # type: ignore[union-attr]
    assert tower and not any(id(p) in tower for p in tr.params)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    tr.train_step(_rollouts(tr))
    changed = [n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and not any(n.startswith("model.visual.") for n in changed)
    assert any("language_model" in n for n in changed)


@pytest.mark.parametrize("mode", ["fp32-master", "stochastic-rounding"])
def test_lora_with_bfloat16_keeps_the_base_in_bfloat16(tiny_model_dir: Path, mode: str) -> None:
    sync = RecordingSync()
    tr = _trainer(tiny_model_dir, _cfg(lora=LORA, dtype="bfloat16", low_precision_update=mode), weight_sync=sync)
    adapter_dtype = torch.float32 if mode == "fp32-master" else torch.bfloat16
    assert {p.dtype for p in tr.params} == {adapter_dtype}
    assert {p.dtype for n, p in tr.model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    m = tr.train_step(_rollouts(tr))
    assert m["grad_norm"] > 0
    changed = {n for n, p in tr.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".lora_" in n for n in changed)
    tr.sync_weights()
    assert sync.sent and {t.dtype for _, t in sync.sent} == {torch.bfloat16}


def test_default_targets_leave_llavas_vision_tower_alone(tiny_model_dirs: dict[str, Path]) -> None:
    model, _ = _load(tiny_model_dirs["llava"])
    # LLaVA's CLIP tower has q_proj/k_proj/v_proj too: a bare name list would adapt it
    assert any(n.endswith("q_proj") for n, _ in vision_tower(model).named_modules())  # type: ignore[union-attr]
    peft_model = apply_lora(model, LoraSettings(r=4, alpha=8))
    names = [n for n, _ in merged_weights(peft_model)]
    assert names and all(n.startswith("model.language_model.") for n in names)
    with pytest.raises(ConfigError, match="target_modules"):
        apply_lora(_load(tiny_model_dirs["llava"])[0], LoraSettings(target_modules=["no_such_module"]))


def test_lora_dropout_is_on_in_the_loss_forward_only(tiny_model_dir: Path) -> None:
    tr = _trainer(tiny_model_dir, _cfg(lora={**LORA, "dropout": 0.5}))
    drops = dropout_modules(tr.model)
    assert len(drops) == 7 * tr.model.config.text_config.num_hidden_layers
    seen: list[bool] = []
    handle = drops[0].register_forward_hook(lambda m, i, o: seen.append(m.training))
    rollouts = _rollouts(tr)  # sampling: the server has no dropout, nor does the in-process sampler
    assert seen and not any(seen)
    seen.clear()
    tr.train_step(rollouts)
    handle.remove()
    assert seen and all(seen) and not any(d.training for d in drops)
