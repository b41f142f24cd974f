"""Adapters on each family's tiny model: shapes, loss mask, vision gradient, logprob alignment."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

from backend.adapters import (
    LlavaAdapter,
    MultimodalBatch,
    Qwen2VLAdapter,
    Qwen3VLAdapter,
    Qwen25VLAdapter,
    adapter_for,
)
from backend.errors import ModelError
from backend.evaluate import generate
from backend.loss import group_advantages, grpo_loss
from backend.rollout_types import Rollout
from backend.sampling import banned_token_ids, bias_vector, logit_bias_for
from backend.trainer import token_logprobs

FAMILY_ADAPTER = {
    "qwen3-vl": Qwen3VLAdapter,
    "qwen2.5-vl": Qwen25VLAdapter,
    "qwen2-vl": Qwen2VLAdapter,
    "llava": LlavaAdapter,
}


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoProcessor.from_pretrained(path)


def _img(w: int, h: int, rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (w, h), rgb)


def _prompts() -> list[tuple[str, list[dict[str, Any]], list[Image.Image]]]:
    """One image; two images of different sizes; one image of yet another size."""
    a, b, c = _img(64, 64, (220, 40, 40)), _img(96, 48, (40, 70, 220)), _img(40, 80, (40, 180, 60))
    return [
        ("one", [{"role": "user", "content": [{"type": "image", "image": a},
                                              {"type": "text", "text": "What colour is this image?"}]}], [a]),
        ("two", [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": b},
                                              {"type": "text", "text": "and"}, {"type": "image", "image": c}]}],
         [b, c]),
        ("tall", [{"role": "user", "content": [{"type": "image", "image": c},
                                               {"type": "text", "text": "Answer with one word."}]}], [c]),
    ]


def _rollouts(model: Any, processor: Any, temperature: float = 1.0, n: int = 2, seed: int = 0) -> list[Rollout]:
    """Sampled rollouts with behaviour logprobs, each prompt generated alone (no padding)."""
    torch.manual_seed(seed)
    out: list[Rollout] = []
    for g, (ex_id, messages, images) in enumerate(_prompts()):
        for k in range(n):
            ((ids, lps, reason),) = generate(model, processor, [(messages, images)], max_tokens=5,
                                             temperature=temperature)
            out.append(Rollout(example_id=ex_id, group=g, messages=messages, images=images, completion="",
                               completion_ids=ids, behavior_logprobs=lps, finish_reason=reason,
                               reward=float(k % 2), index=len(out)))
    adv = group_advantages(torch.tensor([r.reward for r in out]), torch.tensor([r.group for r in out]))
    for r, a in zip(out, adv.tolist()):
        r.advantage = a
    return out


@pytest.fixture(scope="module", params=list(FAMILY_ADAPTER))
def family_model(request: pytest.FixtureRequest, tiny_model_factory: Callable[..., Path]) -> tuple[str, Any, Any]:
    torch.set_num_threads(1)
    family = request.param
    model, processor = _load(tiny_model_factory(family))
    return family, model, processor


def test_adapter_is_chosen_from_model_type(family_model: tuple[str, Any, Any]) -> None:
    family, model, processor = family_model
    adapter = adapter_for(model.config, processor=processor)
    assert type(adapter) is FAMILY_ADAPTER[family]


def test_config_name_overrides_model_type(tiny_model_factory: Callable[..., Path]) -> None:
    model, processor = _load(tiny_model_factory("qwen3-vl"))
    assert type(adapter_for(model.config, "qwen2-vl", processor=processor)) is Qwen2VLAdapter
    with pytest.raises(ModelError, match="unknown adapter"):
        adapter_for(model.config, "pixtral", processor=processor)
    with pytest.raises(ModelError, match="no adapter for model_type 'mystery_vl'"):
        adapter_for({"model_type": "mystery_vl"}, processor=processor)


def test_batch_shapes_and_loss_mask_cover_exactly_the_completion(family_model: tuple[str, Any, Any]) -> None:
    family, model, processor = family_model
    rollouts = _rollouts(model, processor)
    adapter = adapter_for(model.config, processor=processor, max_length=4096)
    batch = adapter.build_batch(rollouts)
    assert isinstance(batch, MultimodalBatch)
    B, L = batch.input_ids.shape
    assert B == len(rollouts) and not batch.dropped
    for t in (batch.attention_mask, batch.loss_mask, batch.behavior_logprobs):
        assert t.shape == (B, L)
    assert batch.rewards.shape == (B,) and batch.advantages.shape == (B,)
    n_images = sum(len(r.images) for r in rollouts)  # 4 images per group of... 2 rollouts x (1 + 2 + 1)
    assert n_images == 8
    if family == "llava":
        assert batch.pixel_values is not None and batch.pixel_values.shape[:2] == (n_images, 3)
        assert batch.pixel_values.ndim == 4
    else:
        grid = batch.extra_model_kwargs["image_grid_thw"]
        assert grid.shape == (n_images, 3)
        assert batch.pixel_values is not None and batch.pixel_values.shape[0] == int(grid.prod(-1).sum())
        assert len({tuple(g) for g in grid.tolist()}) > 1  # images of different sizes in one batch
        assert batch.extra_model_kwargs["mm_token_type_ids"].shape == (B, L)
    for b, r in enumerate(rollouts):
        # the prompt is exactly the processor's encoding, the completion exactly the server's ids
        text = processor.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
        prompt = processor(text=[text], images=[r.images], return_tensors="pt")["input_ids"][0]
        P, C = prompt.numel(), len(r.completion_ids)
        assert batch.input_ids[b, :P].tolist() == prompt.tolist()
        assert batch.input_ids[b, P : P + C].tolist() == r.completion_ids
        assert batch.loss_mask[b].nonzero().flatten().tolist() == list(range(P, P + C))
        assert batch.attention_mask[b].sum() == P + C
        assert batch.behavior_logprobs[b, P : P + C].tolist() == pytest.approx(r.behavior_logprobs)
        assert (batch.behavior_logprobs[b][batch.loss_mask[b] == 0] == 0).all()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_the_trainers_with_unchanged_weights(
    family_model: tuple[str, Any, Any], temperature: float
) -> None:
    family, model, processor = family_model
    rollouts = _rollouts(model, processor, temperature=temperature, seed=1)
    adapter = adapter_for(model.config, processor=processor)
    batch = adapter.build_batch(rollouts)
    vocab = model.get_output_embeddings().weight.shape[0]
    bias = bias_vector(logit_bias_for(banned_token_ids(processor.tokenizer)), vocab)
    with torch.no_grad():
        lp, ent = token_logprobs(model, adapter, batch, temperature=temperature, bias=bias, with_entropy=True)
    assert lp.shape == batch.input_ids.shape
    on = batch.loss_mask > 0
    diff = (lp - batch.behavior_logprobs)[on].abs().max().item()
    assert diff < 1e-4, f"{family}: max |trainer - behaviour| logprob {diff:.2e}"
    assert ent is not None and (ent[on] > 0).all()
    # without the banned-token bias the trainer's distribution differs: the test can fail
    with torch.no_grad():
        lp_nobias, _ = token_logprobs(model, adapter, batch, temperature=temperature, bias=None)
    assert (lp_nobias - batch.behavior_logprobs)[on].abs().max().item() > 1e-3


def test_gradient_reaches_the_vision_tower(family_model: tuple[str, Any, Any]) -> None:
    family, model, processor = family_model
    rollouts = _rollouts(model, processor, seed=2)
    adapter = adapter_for(model.config, processor=processor)
    batch = adapter.build_batch(rollouts)
    assert batch.advantages.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    lp, _ = token_logprobs(model, adapter, batch, temperature=1.0, bias=None)
    grpo_loss(lp, batch.behavior_logprobs, batch.advantages, batch.loss_mask).loss.backward()
    vision = [(n, p) for n, p in model.named_parameters() if "visual" in n or "vision_tower" in n]
    assert vision, "no vision parameters found"
    with_grad = [n for n, p in vision if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) > len(vision) // 2, f"{family}: vision params without gradient"
    model.zero_grad(set_to_none=True)


def test_overlong_and_empty_rollouts_are_dropped_with_a_reason(
    family_model: tuple[str, Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    family, model, processor = family_model
    rollouts = _rollouts(model, processor, n=1, seed=3)
    lengths = {}
    adapter = adapter_for(model.config, processor=processor)
    full = adapter.build_batch(rollouts)
    for b, ex in enumerate(full.example_ids):
        lengths[ex] = int(full.attention_mask[b].sum())
    # a limit that only the two-image prompt exceeds
    limit = max(v for k, v in lengths.items() if k != "two")
    assert lengths["two"] > limit
    rollouts.append(Rollout(example_id="empty", group=3, messages=rollouts[0].messages, images=rollouts[0].images,
                            completion="", completion_ids=[], behavior_logprobs=[], index=99, advantage=0.0))
    short = adapter_for(model.config, processor=processor, max_length=limit)
    with caplog.at_level(logging.WARNING, logger="vlmrl.adapters"):
        batch = short.build_batch(rollouts)
    assert sorted(batch.example_ids) == ["one", "tall"]
    reasons = {d.example_id: d.reason for d in batch.dropped}
    assert reasons["two"].startswith("overlong") and str(limit) in reasons["two"]
    assert reasons["empty"] == "empty completion"
    assert "two" in caplog.text and "empty" in caplog.text
    # kept rows are whole: every image token and every completion token is still there
    for b, ex in enumerate(batch.example_ids):
        assert int(batch.attention_mask[b].sum()) == lengths[ex]


def test_a_rollout_without_an_advantage_is_refused_by_name(family_model: tuple[str, Any, Any]) -> None:
    _, model, processor = family_model
    rollouts = _rollouts(model, processor, n=1)
    rollouts[1].advantage = None
    with pytest.raises(ValueError, match=rf"rollout {rollouts[1].example_id} \(#1\) has no advantage"):
        adapter_for(model.config, processor=processor).build_batch(rollouts)


def test_a_prompt_whose_images_do_not_match_its_placeholders_is_dropped(
    family_model: tuple[str, Any, Any],
) -> None:
    family, model, processor = family_model
    (ex_id, messages, images) = _prompts()[0]
    extra = _img(64, 64, (0, 0, 0))
    r = Rollout(example_id="mismatch", group=0, messages=messages, images=[*images, extra], completion="x",
                completion_ids=[5], behavior_logprobs=[-1.0], advantage=0.0)
    batch = adapter_for(model.config, processor=processor).build_batch([r])
    assert len(batch) == 0 and batch.dropped and batch.dropped[0].example_id == "mismatch"


def test_text_only_prompt_builds_a_batch_without_pixels(tiny_model_factory: Callable[..., Path]) -> None:
    model, processor = _load(tiny_model_factory("qwen3-vl"))
    messages = [{"role": "user", "content": [{"type": "text", "text": "Say a colour."}]}]
    ((ids, lps, _),) = generate(model, processor, [(messages, [])], max_tokens=3)
    r = Rollout(example_id="t", group=0, messages=messages, images=[], completion="", completion_ids=ids,
                behavior_logprobs=lps, advantage=0.0)
    adapter = adapter_for(model.config, processor=processor)
    batch = adapter.build_batch([r])
    assert batch.pixel_values is None and "image_grid_thw" not in batch.extra_model_kwargs
    vocab = model.get_output_embeddings().weight.shape[0]
    bias = bias_vector(logit_bias_for(banned_token_ids(processor.tokenizer)), vocab)
    with torch.no_grad():
        lp, _ = token_logprobs(model, adapter, batch, temperature=1.0, bias=bias)
    on = batch.loss_mask > 0
    assert (lp - batch.behavior_logprobs)[on].abs().max().item() < 1e-4


def test_batch_to_device_keeps_everything() -> None:
    b = MultimodalBatch(
        input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2, dtype=torch.long),
        loss_mask=torch.tensor([[0.0, 1.0]]), behavior_logprobs=torch.tensor([[0.0, -1.0]]),
        rewards=torch.ones(1), advantages=torch.zeros(1), pixel_values=torch.zeros(4, 3),
        extra_model_kwargs={"image_grid_thw": torch.ones(1, 3, dtype=torch.long)}, example_ids=["a"],
    )
    c = b.to("cpu")
    assert c.example_ids == ["a"] and c.num_loss_tokens == 1 and c.num_tokens == 2 and len(c) == 1
    assert c.extra_model_kwargs["image_grid_thw"].shape == (1, 3)


@pytest.mark.parametrize("family", ["qwen3-vl", "qwen2-vl"])
def test_shared_images_run_the_vision_tower_once_with_the_same_values_and_gradients(
    family: str, tiny_model_factory: Callable[..., Path]
) -> None:
    model, processor = _load(tiny_model_factory(family))
    rollouts = _rollouts(model, processor, n=3, seed=4)  # 3 rollouts share each prompt's images
    adapter = adapter_for(model.config, processor=processor)
    batch = adapter.build_batch(rollouts)
    assert batch.image_index is not None
    assert batch.image_index.tolist() == [0, 0, 0, 1, 2, 1, 2, 1, 2, 3, 3, 3]
    calls: list[int] = []
    hook = model.model.visual.register_forward_hook(lambda m, a, o: calls.append(int(a[0].shape[0])))
    try:
        results = []
        for fwd in (lambda: adapter.forward(model, batch), lambda: model(**adapter.model_inputs(batch))):
            model.zero_grad(set_to_none=True)
            logits = fwd().logits
            (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if "visual" in n and p.grad is not None}
            results.append((logits.detach(), grads))
    finally:
        hook.remove()
    grid = batch.extra_model_kwargs["image_grid_thw"]
    distinct = [0, 3, 4, 9]  # first slot of each distinct image
    assert calls == [int(grid[distinct].prod(-1).sum()), int(grid.prod(-1).sum())]
    (l1, g1), (l2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-5)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        rel = ((g1[n] - g2[n]).norm() / g2[n].norm().clamp(min=1e-12)).item()
        assert rel < 1e-5, (n, rel)  # fp32 summation order only
    model.zero_grad(set_to_none=True)


def _count_encodes(adapter: Any) -> list[int]:
    """A list that grows by one each time ``adapter`` encodes a prompt."""
    calls: list[int] = []
    orig = adapter.encode_prompt

    def counting(messages: list[dict[str, Any]], images: list[Any]) -> Any:
        calls.append(1)
        return orig(messages, images)

    adapter.encode_prompt = counting
    return calls


def test_a_groups_prompt_is_encoded_once_even_with_a_fresh_images_list_per_rollout(
    family_model: tuple[str, Any, Any]
) -> None:
    _, model, processor = family_model
    adapter = adapter_for(model.config, processor=processor)
    rollouts = _rollouts(model, processor, n=3)
    for r in rollouts:
        r.images = list(r.images)  # same images, a new list (as Example.images hands out)
    calls = _count_encodes(adapter)
    adapter.validate(rollouts)
    adapter.build_batch(rollouts)
    assert len(calls) == len(_prompts())  # once per prompt, not per rollout or per call
    adapter.build_batch([*rollouts[:1], *rollouts[3:]])  # a copy of an image is another prompt
    rollouts[0].images = [im.copy() for im in rollouts[0].images]
    adapter.build_batch(rollouts[:1])
    assert len(calls) == len(_prompts()) + (1 if rollouts[0].images else 0)


def test_prompts_encoded_ahead_for_the_next_step_leave_this_steps_encodings_alone(
    family_model: tuple[str, Any, Any]
) -> None:
    """The trainer's prefetch thread encodes step k+1 (prepare) while step k trains from its own
    encodings: neither step encodes twice, and the two latest steps are kept."""
    import dataclasses

    _, model, processor = family_model
    adapter = adapter_for(model.config, processor=processor)
    now = _rollouts(model, processor, n=2)
    ahead = [dataclasses.replace(r, step=r.step + 1) for r in now]
    calls = _count_encodes(adapter)
    adapter.validate(now)
    assert len(calls) == len(_prompts())
    adapter.prepare(ahead)  # another step: its own encodings
    assert len(calls) == 2 * len(_prompts())
    adapter.build_batch(now)  # this step's are still there
    adapter.validate(ahead)
    adapter.build_batch(ahead)
    assert len(calls) == 2 * len(_prompts())
    later = [dataclasses.replace(r, step=r.step + 2) for r in now]
    adapter.prepare(later)  # two steps are kept: the oldest goes
    adapter.build_batch(now)
    assert len(calls) == 4 * len(_prompts())
