"""Training precision on the GPU path, checked on CPU: bf16 steps that keep their updates,
stochastic rounding, float16 loss scaling, gradient checkpointing, streamed checkpoints,
and no silent CPU fallback."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from backend import optim
from backend.checkpoint import SAFE_INDEX, SAFE_WEIGHTS, save_weights
from backend.config import load_config
from backend.errors import ConfigError
from backend.optim import StochasticRoundingAdamW, make_optimizer
from backend.precision import precision_of, stochastic_round_
from backend.rollout_types import Rollout
from backend.device import trainer_device
from backend.trainer import MultimodalGRPOTrainer
from tests.tinytrainer import load_tiny, tiny_cfg, tiny_trainer


_load = load_tiny
_cfg = functools.partial(tiny_cfg, learning_rate=1e-5)  # the rate at which bf16 rounding loses updates
_trainer = tiny_trainer


def _rollouts(tr: MultimodalGRPOTrainer) -> list[Rollout]:
    """One fixed batch, every group with mixed rewards (so every sequence has a gradient)."""
    env = tr.env
    assert env is not None
    torch.manual_seed(0)
    rs = tr.rollout_source.collect(env, env.train_examples(1, tr.config.prompts_per_step), tr.config.rollouts_per_step,
                                   temperature=1.0, top_p=1.0, max_tokens=4, step=1, seed=1)
    for i, r in enumerate(rs):
        r.reward = float(i % 2)
    return rs


def _bf16_start(path: Path) -> Any:
    """The tiny model with every weight rounded to bfloat16 (still float32): all schemes start equal."""
    model, _ = _load(path)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


def _delta(tr: MultimodalGRPOTrainer, rollouts: list[Rollout]) -> dict[str, torch.Tensor]:
    before = {n: p.detach().float().clone() for n, p in tr.model.named_parameters()}
    tr.train_step(rollouts)
    return {n: p.detach().float() - before[n] for n, p in tr.model.named_parameters()}


def _flat(d: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in d.values()])


# --- stochastic rounding ------------------------------------------------------------------


def test_stochastic_rounding_is_unbiased_and_keeps_representable_values() -> None:
    g = torch.Generator().manual_seed(0)
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    ulp = 2.0**-7  # bfloat16 ulp at 1.0
    src = torch.full((200_000,), 1.0 + 0.3 * ulp)
    out = torch.empty(200_000, dtype=torch.bfloat16)
    stochastic_round_(out, src.clone(), generator=g)
    vals = set(out.float().unique().tolist())
    assert vals == {1.0, 1.0 + ulp}  # only the two neighbours
    assert out.float().mean().item() == pytest.approx(1.0 + 0.3 * ulp, abs=0.01 * ulp)
    neg = torch.full((200_000,), -(1.0 + 0.3 * ulp))
    stochastic_round_(out, neg.clone(), generator=g)
    assert out.float().mean().item() == pytest.approx(-(1.0 + 0.3 * ulp), abs=0.01 * ulp)
    exact = torch.randn(1000).to(torch.bfloat16)
    stochastic_round_(out[:1000], exact.float(), generator=g)
    assert torch.equal(out[:1000], exact)
    assert lo.item() == 1.0


def test_stochastic_rounding_refuses_other_dtypes() -> None:
    with pytest.raises(TypeError, match="float32 -> bfloat16"):
        stochastic_round_(torch.empty(2, dtype=torch.float16), torch.zeros(2))


@pytest.mark.parametrize("chunk", [7, optim.SR_CHUNK])
def test_sr_adamw_follows_adamw_math(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    """With updates far above a bf16 ulp, rounding hardly matters: the result is AdamW's
    (bias correction, decoupled weight decay) within a bf16 ulp, chunked or not."""
    monkeypatch.setattr(optim, "SR_CHUNK", chunk)
    torch.manual_seed(0)
    w0 = torch.randn(5, 13).to(torch.bfloat16).float()
    ref = torch.nn.Parameter(w0.clone())
    sr = torch.nn.Parameter(w0.to(torch.bfloat16))
    o_ref = torch.optim.AdamW([ref], lr=0.05, weight_decay=0.1)
    o_sr = StochasticRoundingAdamW([sr], lr=0.05, weight_decay=0.1)
    for step in range(3):
        g = torch.randn(5, 13)
        ref.grad, sr.grad = g.clone(), g.to(torch.bfloat16)
        o_ref.step()
        o_sr.step()
    ulp = ref.detach().abs().clamp_min(1e-3) * 2.0**-7
    assert ((sr.detach().float() - ref.detach()).abs() <= 3 * ulp + 1e-3).all()
    state = o_sr.state_dict()
    o2 = StochasticRoundingAdamW([torch.nn.Parameter(sr.detach().clone())], lr=0.05)
    o2.load_state_dict(state)
    assert torch.equal(o2.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


def test_sr_adamw_refuses_float32_parameters() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    with pytest.raises(TypeError, match="bfloat16 parameters"):
        StochasticRoundingAdamW([p]).step()


# --- config and precision resolution --------------------------------------------------------


def test_precision_of_each_setting() -> None:
    p32 = precision_of("float32")
    assert p32.param_dtype == p32.compute_dtype == torch.float32 and not p32.autocast
    mp = precision_of("bfloat16")
    assert mp.param_dtype == torch.float32 and mp.compute_dtype == torch.bfloat16 and mp.autocast
    assert not mp.loss_scaling
    assert precision_of("float16").loss_scaling
    sr = precision_of("bfloat16", "stochastic-rounding")
    assert sr.param_dtype == torch.bfloat16 and sr.stochastic_rounding and not sr.autocast


def test_stochastic_rounding_needs_bfloat16(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('model = "builtin:tiny-qwen3-vl"\n[env]\nid = "colors"\n[trainer.args]\n'
                 'dtype = "float16"\nlow_precision_update = "stochastic-rounding"\n')
    with pytest.raises(ConfigError, match=r"trainer\.args\.low_precision_update.*bfloat16"):
        load_config(f)


def test_optimizer_has_no_whole_model_temporary() -> None:
    params = [torch.nn.Parameter(torch.zeros(4))]
    opt, _ = make_optimizer(params, _cfg())
    # on CPU torch's default is the per-parameter loop (foreach only defaults on for CUDA)
    assert isinstance(opt, torch.optim.AdamW) and not opt.defaults.get("foreach") and not opt.defaults.get("fused")
    sr, _ = make_optimizer([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))],
                           _cfg(dtype="bfloat16", low_precision_update="stochastic-rounding"))
    assert isinstance(sr, StochasticRoundingAdamW)


# --- a bf16 step moves the weights like an fp32 step -------------------------------------------


@pytest.fixture(scope="module")
def fp32_delta(tiny_model_dir: Path) -> tuple[dict[str, torch.Tensor], list[Rollout]]:
    tr = _trainer(tiny_model_dir, _cfg(), model=_bf16_start(tiny_model_dir))
    rollouts = _rollouts(tr)
    return _delta(tr, rollouts), rollouts


def _ratio(delta: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(projection of ``delta`` on ``ref`` / |ref|^2, fraction of ref's moved weights that moved)."""
    d, r = _flat(delta), _flat(ref)
    moved = r != 0
    return float((d * r).sum() / (r * r).sum()), float((d[moved] != 0).float().mean())


def test_bf16_with_fp32_master_weights_moves_like_fp32(tiny_model_dir: Path, fp32_delta: Any) -> None:
    ref, rollouts = fp32_delta
    tr = _trainer(tiny_model_dir, _cfg(dtype="bfloat16"), model=_bf16_start(tiny_model_dir))
    assert next(tr.model.parameters()).dtype == torch.float32  # the master weights
    proj, moved = _ratio(_delta(tr, rollouts), ref)
    assert moved > 0.99 and proj == pytest.approx(1.0, abs=0.05)  # measured: 0.9998, 0.997


def test_bf16_with_stochastic_rounding_moves_like_fp32_in_expectation(tiny_model_dir: Path, fp32_delta: Any) -> None:
    ref, rollouts = fp32_delta
    model = _bf16_start(tiny_model_dir).to(torch.bfloat16)
    tr = _trainer(tiny_model_dir, _cfg(dtype="bfloat16", low_precision_update="stochastic-rounding"), model=model)
    assert next(tr.model.parameters()).dtype == torch.bfloat16
    proj, _ = _ratio(_delta(tr, rollouts), ref)
    assert proj == pytest.approx(1.0, abs=0.05)  # measured 0.998-1.000 over 3 seeds


def test_plain_bf16_adamw_drops_the_update(tiny_model_dir: Path, fp32_delta: Any) -> None:
    """What vlmrl did before (bf16 weights, plain AdamW) fails the same criterion: the check
    above can tell a lost update from a kept one."""
    ref, rollouts = fp32_delta
    model = _bf16_start(tiny_model_dir).to(torch.bfloat16)
    tr = _trainer(tiny_model_dir, _cfg(dtype="bfloat16", low_precision_update="stochastic-rounding"), model=model)
    tr.optimizer = torch.optim.AdamW(tr.params, lr=1e-5)
    tr.scheduler = torch.optim.lr_scheduler.LambdaLR(tr.optimizer, lambda s: 1.0)
    proj, moved = _ratio(_delta(tr, rollouts), ref)
    assert moved < 0.5 and abs(proj - 1.0) > 0.3  # measured: 14% moved, projection 0.17


def test_float16_trains_with_fp32_master_weights_and_loss_scaling(tiny_model_dir: Path) -> None:
    tr = _trainer(tiny_model_dir, _cfg(dtype="float16", learning_rate=1e-3))
    assert tr.scaler is not None and next(tr.model.parameters()).dtype == torch.float32
    rollouts = _rollouts(tr)
    moved = 0
    for _ in range(3):  # the first steps may overflow at the initial scale and be skipped
        moved += int(bool((_flat(_delta(tr, rollouts)) != 0).any()))
    assert moved >= 1 and tr.scaler.get_scale() > 0


class RecordingSync:
    def __init__(self) -> None:
        self.dtypes: list[Any] = []

    def sync(self, named_tensors: Any, version: int, dtype: Any = None) -> None:
        self.dtypes.append(dtype)

    def reconnect(self, timeout_s: float | None = None) -> None:
        raise AssertionError("unused")


def test_master_weights_are_sent_in_the_compute_dtype(tiny_model_dir: Path) -> None:
    sync = RecordingSync()
    tr = _trainer(tiny_model_dir, _cfg(dtype="bfloat16"), weight_sync=sync)
    tr.sync_weights()
    tr32 = _trainer(tiny_model_dir, _cfg(), weight_sync=sync)
    tr32.sync_weights()
    assert sync.dtypes == [torch.bfloat16, None]


# --- gradient checkpointing --------------------------------------------------------------------


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_model_dir: Path) -> None:
    grads, calls = [], []
    for ckpt in (False, True):
        tr = _trainer(tiny_model_dir, _cfg(gradient_checkpointing=ckpt))
        layer = tr.model.model.language_model.layers[0]
        n = [0]
        layer.mlp.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        rollouts = _rollouts(tr)
        n[0] = 0
        captured: dict[str, torch.Tensor] = {}
        orig = torch.nn.utils.clip_grad_norm_

        def capture(params: Any, max_norm: float, tr: MultimodalGRPOTrainer = tr) -> Any:
            captured.update({k: p.grad.detach().clone() for k, p in tr.model.named_parameters() if p.grad is not None})
            return orig(params, max_norm)

        torch.nn.utils.clip_grad_norm_ = capture  # type: ignore[assignment]
        try:
            tr.train_step(rollouts)
        finally:
            torch.nn.utils.clip_grad_norm_ = orig  # type: ignore[assignment]
        grads.append(captured)
        calls.append(n[0])
        assert not tr.model.training and not layer.training  # back in eval mode after the step
    assert calls[1] == 2 * calls[0] > 0  # each layer's forward ran again in the backward
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert torch.allclose(grads[0][k], grads[1][k], atol=1e-6), k


# --- streamed checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("shard_bytes", [None, 200_000])
def test_streamed_weights_load_as_a_hugging_face_model(tiny_model_dir: Path, tmp_path: Path,
                                                       shard_bytes: int | None) -> None:
    from transformers import AutoModelForImageTextToText

    from backend.weight_sync.layout import flatten_parameters

    model, _ = _load(tiny_model_dir)
    flatten_parameters(model)  # parameters sharing one buffer: what save_pretrained would clone
    files = save_weights(model, tmp_path, **({"shard_bytes": shard_bytes} if shard_bytes else {}))
    if shard_bytes:
        assert len(files) > 1 and (tmp_path / SAFE_INDEX).is_file()
        index = json.loads((tmp_path / SAFE_INDEX).read_text())
        assert set(index["weight_map"].values()) == {f.name for f in files}
    else:
        assert [f.name for f in files] == [SAFE_WEIGHTS]
    back = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32)
    want = dict(model.state_dict())
    got = dict(back.state_dict())
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_streamed_weights_match_save_pretrained_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model, _ = _load(tiny_model_dir)
    model.save_pretrained(tmp_path / "hf")
    save_weights(model, tmp_path / "ours")
    a, b = load_file(str(tmp_path / "hf" / SAFE_WEIGHTS)), load_file(str(tmp_path / "ours" / SAFE_WEIGHTS))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- no silent CPU fallback ---------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_gpus_without_cuda_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")
    with pytest.raises(ConfigError, match=r"trainer\.gpus: \[trainer\] gpus = 1 but CUDA is not usable here "
                                          r"\(CUDA_VISIBLE_DEVICES='7'"):
        trainer_device("auto", 1)
    with pytest.raises(ConfigError, match=r"trainer\.args\.device"):
        trainer_device("cuda", 0)
    assert trainer_device("auto", 0) == "cpu" and trainer_device("cpu", 2) == "cpu"
