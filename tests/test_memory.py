"""The trainer memory estimate: exact parameter counts, and byte counts checked against what
torch really holds (parameters, gradients, AdamW state, tensors saved for the backward)."""

from __future__ import annotations

import contextlib
import weakref
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from backend.config import load_config
from backend.memory import (
    GiB,
    H100_80GB_BYTES,
    ModelShape,
    estimate_for_config,
    estimate_trainer_memory,
    hf_config,
    model_shape,
    qwen3_vl_8b_config,
    saved_activation_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
MODES = {"float32": ("float32", "fp32-master"), "fp32-master": ("bfloat16", "fp32-master"),
         "stochastic-rounding": ("bfloat16", "stochastic-rounding")}


@pytest.fixture(scope="module")
def shape_8b() -> ModelShape:
    return model_shape(qwen3_vl_8b_config())


def _count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def test_meta_count_equals_the_real_count_of_every_tiny_family(tiny_model_dir: Path,
                                                                tiny_model_dirs: dict[str, Path]) -> None:
    from transformers import AutoModelForImageTextToText

    for path in [tiny_model_dir, *tiny_model_dirs.values()]:
        real = AutoModelForImageTextToText.from_pretrained(path)
        shape = model_shape(hf_config(str(path)))
        assert shape.params == _count(real), path
        assert shape.param_tensors == len(list(real.parameters()))
        assert shape.largest_param == max(p.numel() for p in real.parameters())


def test_builtin_config_is_read_without_building(tiny_model_dir: Path) -> None:
    assert model_shape(hf_config("builtin:tiny-qwen3-vl")).params == model_shape(hf_config(str(tiny_model_dir))).params


def test_tied_embeddings_are_counted_once(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText

    cfg = hf_config(str(tiny_model_dir))
    untied = model_shape(cfg).params
    cfg.tie_word_embeddings = True
    cfg.get_text_config().tie_word_embeddings = True
    tied = model_shape(cfg)
    real = AutoModelForImageTextToText.from_config(cfg)
    assert real.lm_head.weight is real.get_input_embeddings().weight
    assert tied.params == _count(real) == untied - cfg.get_text_config().vocab_size * cfg.get_text_config().hidden_size


def test_qwen3_vl_8b_config_has_the_published_parameter_count(shape_8b: ModelShape) -> None:
    assert shape_8b.params == 8_767_123_696  # 8.77 B, as the model card says
    assert (shape_8b.hidden, shape_8b.layers, shape_8b.vocab, shape_8b.vision_layers) == (4096, 36, 151936, 27)
    assert shape_8b.largest_param == 151936 * 4096  # embedding / lm_head (not tied)


def test_unknown_hub_model_is_a_one_line_reason() -> None:
    from backend.errors import ModelError

    with pytest.raises(ModelError, match=r"^nobody/not-a-model-xyz is not in the Hugging Face cache \(hugg"):
        hf_config("nobody/not-a-model-xyz")


def test_the_8b_hub_id_is_known_before_its_download(shape_8b: ModelShape) -> None:
    from backend.models import _in_hf_cache

    if _in_hf_cache("Qwen/Qwen3-VL-8B-Instruct"):
        pytest.skip("the real config is in the Hugging Face cache here; vlmrl's copy is not used")
    assert model_shape(hf_config("Qwen/Qwen3-VL-8B-Instruct")) == shape_8b


# ----- static memory: what an AdamW step really holds -----


def _inputs(cfg: Any, B: int, L: int, image_side: int, padded: bool) -> dict[str, Any]:
    """Token ids with one image of ``image_side`` x ``image_side`` patches per sequence."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (B, L), generator=g)  # byte-level tokens, no special ones
    n_img = (image_side // 2) ** 2
    ids[:, 1:1 + n_img] = cfg.image_token_id
    am = torch.ones(B, L, dtype=torch.long)
    if padded:
        am[1:, L - 3:] = 0
    types = torch.zeros(B, L, dtype=torch.long)
    types[:, 1:1 + n_img] = 1
    v = cfg.vision_config
    pixels = torch.randn(B * image_side**2, v.in_channels * v.temporal_patch_size * v.patch_size**2, generator=g)
    return dict(input_ids=ids, attention_mask=am, mm_token_type_ids=types, pixel_values=pixels,
                image_grid_thw=torch.tensor([[1, image_side, image_side]] * B))


def test_static_estimate_equals_params_grads_and_adamw_state_after_a_real_step(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from backend.config import MultimodalRLConfig
    from backend.optim import make_optimizer

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32)
    opt, _ = make_optimizer(list(model.parameters()), MultimodalRLConfig())
    out = model(**_inputs(model.config, 2, 40, 4, padded=True), use_cache=False)
    out.logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())  # every tensor trains, so every one has state
    opt.step()
    held = sum(p.nbytes for p in model.parameters()) + sum(p.grad.nbytes for p in model.parameters())
    held += sum(t.nbytes for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor))
    est = estimate_trainer_memory(model_shape(model.config), dtype="float32", micro_batch_size=1, seq_len=8)
    assert est.static == held


# ----- activations: what autograd saves for the backward -----


@contextlib.contextmanager
def _saved_tensors(params: set[int]) -> Iterator[dict[str, dict[int, int]]]:
    """Storage bytes autograd saves, split into activations and autocast's weight copies."""
    seen: dict[str, dict[int, int]] = {"activations": {}, "weight copies": {}}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() in params:
            return t
        fn = t.grad_fn
        for _ in range(4):  # a cast weight reaches its parameter through casts, transposes and views
            if fn is None or type(fn).__name__ not in ("ToCopyBackward0", "TBackward0", "ViewBackward0"):
                break
            fn = fn.next_functions[0][0] if fn.next_functions else None
        kind = "weight copies" if fn is not None and type(fn).__name__ == "AccumulateGrad" else "activations"
        seen[kind][st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield seen


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of the tensors created inside it (activations, gradients, temporaries)."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.skip, self.live, self.now, self.peak = skip, set(), 0, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                ptr = st.data_ptr()
                if ptr and ptr not in self.live and ptr not in self.skip:
                    self.live.add(ptr)
                    self.now += st.nbytes()
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, ptr, st.nbytes())
        return out

    def _free(self, ptr: int, n: int) -> None:
        self.live.discard(ptr)
        self.now -= n


def _forward(mode: str, B: int, L: int, side: int, ckpt: bool,
             tiny_model_dir: Path) -> tuple[ModelShape, int, int, int]:
    """Live bytes at the end of a forward (parameters aside), autocast's weight copies among
    them, and the bias elements of the Linear/Conv layers."""
    from transformers import AutoModelForImageTextToText

    cfg = hf_config(str(tiny_model_dir))
    dtype = torch.bfloat16 if mode == "stochastic-rounding" else torch.float32
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "fp32-master" else contextlib.nullcontext()
    with _LiveBytes(params) as live, _saved_tensors(params) as seen, cast:
        inputs = _inputs(cfg, B, L, side, padded=B > 1)  # the batch counts: fp32 pixels, as processors make them
        out = model(**inputs, use_cache=False, logits_to_keep=1)  # holds the graph, so what it saved
        held = live.now  # inside autocast: its cache of weight copies is still alive
    del out
    biases = sum(m.bias.numel() for m in model.modules()
                 if isinstance(m, (torch.nn.Linear, torch.nn.Conv3d)) and m.bias is not None)
    return model_shape(cfg), held, sum(seen["weight copies"].values()), biases


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("B,ckpt", [(1, False), (3, False), (3, True)])
def test_saved_activations_match_what_a_real_forward_holds(mode: str, B: int, ckpt: bool,
                                                           tiny_model_dir: Path) -> None:
    L, side = 96, 8  # 16 image tokens (64 patches) per sequence
    shape, held, copies, biases = _forward(mode, B, L, side, ckpt, tiny_model_dir)
    dtype, lpu = MODES[mode]
    est = estimate_trainer_memory(shape, dtype=dtype, low_precision_update=lpu, micro_batch_size=B, seq_len=L)
    autocast_weights = est.weights if mode == "fp32-master" else 0
    predicted = saved_activation_bytes(shape, mode, micro_batch_size=B, seq_len=L,  # type: ignore[arg-type]
                                       image_tokens=(side // 2) ** 2, gradient_checkpointing=ckpt)
    assert predicted == pytest.approx(held - autocast_weights, rel=0.03)
    text_only = saved_activation_bytes(shape, mode, micro_batch_size=B, seq_len=L,  # type: ignore[arg-type]
                                       gradient_checkpointing=ckpt)
    assert held - autocast_weights > text_only * 1.1  # the image's share is real, not inside the tolerance
    if mode != "fp32-master":
        assert copies == 0
    elif not ckpt:  # every Linear/Conv weight is cast once; the cache holds the bias casts too, but
        assert copies == est.weights - 2 * biases  # the backward needs no bias, so autograd saves none
    else:  # checkpointed layers save nothing; the cache still holds their casts (counted in `held`)
        assert 0 < copies < est.weights - 2 * biases


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_peak_bounds_a_real_forward_and_backward(mode: str, ckpt: bool, tiny_model_dir: Path) -> None:
    """The trainer's own logprob path (logits_to_keep, fp32 log-softmax, entropy) on a second
    micro-batch (gradients already there): the estimate is an upper bound, and not a loose one."""
    from transformers import AutoModelForImageTextToText

    from backend.loss import entropy_from_logprobs
    from backend.sampling import processed_logprobs

    cfg = hf_config(str(tiny_model_dir))
    dtype = torch.bfloat16 if mode == "stochastic-rounding" else torch.float32
    model = AutoModelForImageTextToText.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    if ckpt:
        model.activation_checkpointing_enable({"use_reentrant": False})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    B, L, T, side = 4, 160, 33, 8
    skip = {t.untyped_storage().data_ptr() for p in model.parameters() for t in (p, p.grad)}
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "fp32-master" else contextlib.nullcontext()
    bias = torch.zeros(cfg.get_text_config().vocab_size)
    with _LiveBytes(skip) as live:
        inputs = _inputs(cfg, B, L, side, padded=True)
        with cast:
            logits = model(**inputs, use_cache=False, logits_to_keep=T).logits
        lp = processed_logprobs(logits[:, :-1], 1.0, bias)
        chosen = lp.gather(-1, inputs["input_ids"][:, L - T + 1:].unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():
            entropy_from_logprobs(lp.detach())
        del logits, lp
        chosen.sum().backward()
    dt, lpu = MODES[mode]
    est = estimate_trainer_memory(model_shape(cfg), dtype=dt, low_precision_update=lpu, micro_batch_size=B,
                                  seq_len=L, logit_positions=T, image_tokens=(side // 2) ** 2,
                                  gradient_checkpointing=ckpt)
    predicted = est.activations + (est.weights if mode == "fp32-master" else 0)
    assert live.peak <= predicted <= 1.4 * live.peak


# ----- the 8B model -----


def test_8b_fp32_master_does_not_fit_an_80gb_card(shape_8b: ModelShape) -> None:
    est = estimate_trainer_memory(shape_8b, dtype="bfloat16", low_precision_update="fp32-master",
                                  micro_batch_size=1, seq_len=1024, gradient_checkpointing=True)
    assert est.master_weights + est.grads + est.optimizer_state > 16 * shape_8b.params
    assert est.total > H100_80GB_BYTES


def test_8b_stochastic_rounding_holds_8_bytes_per_parameter(shape_8b: ModelShape) -> None:
    est = estimate_trainer_memory(shape_8b, dtype="bfloat16", low_precision_update="stochastic-rounding",
                                  micro_batch_size=1, seq_len=1024, gradient_checkpointing=True)
    assert est.static == 8 * shape_8b.params + 4 * shape_8b.param_tensors  # + AdamW's step counters
    assert round(est.static / GiB, 1) == 65.3
    from backend.optim import SR_CHUNK

    assert SR_CHUNK < shape_8b.largest_param  # the step works on chunks of the embedding, not all of it
    assert est.optimizer_step == 5 * 4 * SR_CHUNK


def test_shipped_8b_recipe_fits_one_80gb_card_and_the_old_one_did_not(shape_8b: ModelShape) -> None:
    cfg = load_config(ROOT / "configs" / "qwen3-vl-8b-colors.toml")
    a = cfg.trainer.args
    assert (a.low_precision_update, a.gradient_checkpointing) == ("stochastic-rounding", True)
    assert "P2P_DISABLE" not in {k.upper().removeprefix("NCCL_") for k in cfg.nccl}
    est = estimate_for_config(shape_8b, cfg)
    assert est.total < 0.95 * H100_80GB_BYTES, est.describe()
    old = estimate_trainer_memory(shape_8b, dtype="bfloat16", low_precision_update="stochastic-rounding",
                                  micro_batch_size=4, seq_len=8192, logit_positions=33, image_tokens=8192 - 32,
                                  gradient_checkpointing=True)
    assert old.total > H100_80GB_BYTES, old.describe()  # micro-batches of 4 x 8192 tokens
    text = (ROOT / "configs" / "qwen3-vl-8b-colors.toml").read_text()
    assert f"{est.total / GiB:.0f} GiB" in text  # the comment states what the doctor estimates


def test_checkpointing_and_smaller_micro_batches_shrink_only_activations(shape_8b: ModelShape) -> None:
    kw: dict[str, Any] = dict(dtype="bfloat16", low_precision_update="stochastic-rounding", seq_len=8192,
                              logit_positions=33)
    full = estimate_trainer_memory(shape_8b, micro_batch_size=4, **kw)
    ckpt = estimate_trainer_memory(shape_8b, micro_batch_size=4, gradient_checkpointing=True, **kw)
    small = estimate_trainer_memory(shape_8b, micro_batch_size=1, gradient_checkpointing=True, **kw)
    assert full.static == ckpt.static == small.static
    assert full.activations > 10 * ckpt.activations > 10 * small.activations
    lora = estimate_trainer_memory(shape_8b, micro_batch_size=1, trainable_fraction=0.01, **kw)
    assert lora.weights == full.weights and lora.grads == pytest.approx(0.01 * full.grads, rel=1e-6)
