"""Broken and unusual images: each image mode served as the processors convert it (or refused with
a clear 4xx), and a run whose environment yields broken images drops those examples and goes on.

Image modes (real hf server, real tiny model): the client sends every image as 8-bit RGB
PNG (``backend.serve.protocol.to_rgb``: transparency onto white as the HF processors do,
16-bit grey scaled to 8 bits) and the server converts whatever it receives the same way, so
the server's logprobs match the trainer's forward pass on the rollout's own images. 32-bit
integer and float images (modes I, F) have no agreed 8-bit scale: the server answers 400
invalid_image and the client drops the example.

Runs (in-process trainer, real server): examples whose image is empty, truncated, over the
server's pixel limit, too many, or whose prompt is too long are dropped with a record in
rollouts.jsonl, a log line and the ``examples_dropped`` metric, and the run completes; a run
that loses every example three steps in a row stops with a clear error; a config-level 4xx
(unknown model, a token id outside the vocabulary) still stops the run at once.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from backend import contract
from backend import records as rec
from backend.adapters import adapter_for
from backend.errors import VlmrlError
from backend.records import DropRecord, RolloutRecord
from backend.rollout import RolloutClient, RolloutError, to_openai_messages
from backend.rollout_types import StepRollouts
from backend.rundir import RunDirectory, read_jsonl
from backend.sampling import banned_token_ids
from backend.serve.protocol import to_rgb
from backend.trainer import MultimodalGRPOTrainer
from environments.base import Environment, Example, Score
from tests.serverproc import ServerProc, encode, forward_logprobs, load_trainer_side, serving
from tests.tinytrainer import tiny_cfg

MAX_PIXELS = 256 * 256
SERVED = ("RGB", "RGBA", "LA", "L", "P", "P+transparency", "CMYK", "1", "I;16")
REFUSED = ("I", "F")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    with serving(tmp_path_factory.mktemp("broken-images"), "tok", max_image_pixels=MAX_PIXELS,
                 batch_wait_ms=20.0) as proc:
        yield proc


@pytest.fixture(scope="module")
def trainer_side(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_trainer_side(tiny_model_dir)


@pytest.fixture(scope="module")
def banned(trainer_side: tuple[Any, Any]) -> list[int]:
    return banned_token_ids(trainer_side[1].tokenizer)


# --------------------------------------------------------------------------- image modes


def _base(size: int = 64) -> Image.Image:
    """A deterministic picture: colour gradients with noise (every pixel matters)."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:size, 0:size]
    arr = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1) + rng.integers(0, 40, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def mode_image(mode: str) -> tuple[Image.Image, str]:
    """(an image of ``mode``, the format that holds it losslessly)."""
    base = _base()
    alpha = Image.fromarray(np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1)), "L")  # 0: see-through
    rng = np.random.default_rng(1)
    if mode == "RGBA":
        return Image.merge("RGBA", (*base.split(), alpha)), "PNG"
    if mode == "LA":
        return Image.merge("LA", (base.convert("L"), alpha)), "PNG"
    if mode == "P+transparency":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        img.info["transparency"] = 0
        return img, "PNG"
    if mode == "I;16":
        return Image.fromarray((np.asarray(base.convert("L"), dtype=np.int64) * 257 + 100).clip(0, 65535)
                               .astype(np.uint16)), "PNG"
    if mode == "I":
        return Image.fromarray(rng.integers(0, 70000, (64, 64)).astype(np.int32)), "TIFF"
    if mode == "F":
        return Image.fromarray(rng.random((64, 64), dtype=np.float32)), "TIFF"
    return (base if mode == "RGB" else base.convert(mode)), ("TIFF" if mode == "CMYK" else "PNG")


def file_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def messages(img: Any, text: str = "What colour is this?", n_images: int = 1) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*({"type": "image", "image": img} for _ in range(n_images)),
                                         {"type": "text", "text": text}]}]


def test_every_mode_goes_as_rgb_the_way_the_processor_converts_it(trainer_side: tuple[Any, Any]) -> None:
    ip = trainer_side[1].image_processor
    for mode in SERVED:
        img, fmt = mode_image(mode)
        img = Image.open(io.BytesIO(file_bytes(img, fmt)))  # as an environment would load it
        assert img.mode == mode.split("+")[0], mode
        wire, local, (sent,) = to_openai_messages(messages(img))
        assert sent.mode == "RGB" and local[0]["content"][0]["image"] is sent
        assert np.array_equal(np.asarray(sent), np.asarray(to_rgb(img))), mode  # PNG keeps every pixel
        if mode != "I;16":  # the processor's own conversion of the original gives the very same input
            torch.testing.assert_close(ip(images=[img], return_tensors="pt")["pixel_values"],
                                       ip(images=[sent], return_tensors="pt")["pixel_values"], atol=0, rtol=0)
    rgba, _ = mode_image("RGBA")
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # fully transparent: white, as the processor does
    i16, _ = mode_image("I;16")  # scaled to 8 bits, not clipped to white as PIL's convert("RGB") would
    grey = np.asarray(_base().convert("L"), dtype=np.float64)
    assert np.abs(np.asarray(to_rgb(i16))[..., 0] - grey).max() <= 1
    assert np.asarray(i16.convert("RGB")).mean() > 250  # what the processor alone would see
    for mode in REFUSED:
        img, fmt = mode_image(mode)
        with pytest.raises(RolloutError, match="no agreed 8-bit scale") as e:
            to_openai_messages(messages(Image.open(io.BytesIO(file_bytes(img, fmt)))))
        assert e.value.code == "invalid_image"


class ModesEnv(Environment):
    """One example per image mode, loaded from the file format that holds it."""

    id = "modes"

    def __init__(self, modes: tuple[str, ...]) -> None:
        self.modes = modes

    def train_examples(self, step: int, n: int) -> list[Example]:
        out = []
        for mode in self.modes:
            img, fmt = mode_image(mode)
            out.append(Example(mode, messages(Image.open(io.BytesIO(file_bytes(img, fmt))))))
        return out

    def eval_examples(self, n: int) -> list[Example]:
        return self.train_examples(0, n)

    def score(self, example: Example, completion: str) -> Score:
        return Score(float("red" in completion))


def test_server_logprobs_match_the_trainer_on_every_served_mode(server: ServerProc, trainer_side: tuple[Any, Any],
                                                                banned: list[int]) -> None:
    model, processor = trainer_side
    env = ModesEnv(SERVED + REFUSED)
    with RolloutClient(server.url, banned_ids=banned, max_concurrent=4) as client:
        got = client.collect(env, env.train_examples(0, 0), n=2, temperature=1.0, max_tokens=4, step=1)
    assert isinstance(got, StepRollouts)
    assert sorted({r.example_id for r in got}) == sorted(SERVED)
    assert [(d.example_id, d.code) for d in got.dropped] == [(m, "invalid_image") for m in REFUSED]
    assert all("no agreed 8-bit scale" in d.reason for d in got.dropped)
    for r in got:  # the trainer's forward pass on the rollout's own (RGB) images gives the server's logprobs
        ref = forward_logprobs(model, encode(processor, r.messages), r.completion_ids, 1.0, client.logit_bias)
        torch.testing.assert_close(torch.tensor(r.behavior_logprobs),
                                   ref.gather(1, torch.tensor(r.completion_ids)[:, None]).squeeze(1),
                                   atol=1e-4, rtol=0, msg=lambda m, r=r: f"{r.example_id}: {m}")


def _raw_body(data: bytes, fmt: str, bias: dict[str, float]) -> dict[str, Any]:
    url = f"data:image/{fmt.lower()};base64," + base64.b64encode(data).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What colour is this?"}]}],
            "temperature": 0.0, "max_tokens": 4, "logprobs": True, "return_token_ids": True, "logit_bias": bias}


def test_the_server_converts_raw_modes_as_the_client_does_or_refuses_them(
        server: ServerProc, trainer_side: tuple[Any, Any], banned: list[int]) -> None:
    """Images of every mode sent as they are (not by our client): served as the client's RGB
    conversion of them, or refused with 400 invalid_image."""
    model, processor = trainer_side
    bias = {str(t): -100.0 for t in banned}
    for mode in SERVED + REFUSED:
        img, fmt = mode_image(mode)
        r = httpx.post(server.url + contract.ROUTE_CHAT, json=_raw_body(file_bytes(img, fmt), fmt, bias), timeout=60)
        if mode in REFUSED:
            assert r.status_code == 400, (mode, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_image" and f"mode {mode}" in err["message"], err
            continue
        assert r.status_code == 200, (mode, r.text)
        choice = r.json()["choices"][0]
        ids, lps = choice["token_ids"], [e["logprob"] for e in choice["logprobs"]["content"]]
        _, local, _ = to_openai_messages(messages(img))
        enc = encode(processor, local)
        assert r.json()["prompt_token_ids"] == enc["input_ids"][0].tolist()
        ref = forward_logprobs(model, enc, ids, 0.0, bias)
        assert ids == ref.argmax(-1).tolist(), mode
        torch.testing.assert_close(torch.tensor(lps), ref.gather(1, torch.tensor(ids)[:, None]).squeeze(1),
                                   atol=1e-4, rtol=0)
    assert httpx.get(server.url + contract.ROUTE_HEALTH).status_code == 200


# --------------------------------------------------------------------------- runs


def _png(path: Path, size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


class BrokenImagesEnv(Environment):
    """Four prompts a step; the broken ones (by step) among good 64x64 pictures:

    step 1: a 0-byte file (handed over as the bytes read), a truncated PNG (lazily opened);
    step 2: a 4000x4000 PNG (over the server's pixel limit), two images (the limit is one);
    step 3: a prompt longer than max_model_len. Later steps are all good, unless
    ``all_broken``: then every example of every step is a truncated PNG.
    """

    id = "broken-images"

    def __init__(self, media: Path, all_broken: bool = False) -> None:
        self.media, self.all_broken = media, all_broken
        self.good = _png(media / "good.png", (64, 64))
        (media / "zero.png").write_bytes(b"")
        full = (media / "good.png").read_bytes()
        (media / "truncated.png").write_bytes(full[: len(full) // 2])
        _png(media / "huge.png", (4000, 4000), (30, 30, 200))

    def _example(self, step: int, k: int, kind: str) -> Example:
        img: Any = Image.open(self.good)
        text, n_images = "What colour is this?", 1
        if kind == "zero":
            img = (self.media / "zero.png").read_bytes()  # Image.open cannot even identify it
        elif kind in ("truncated", "huge"):
            img = Image.open(self.media / f"{kind}.png")  # lazy: only the header is read here
        elif kind == "two":
            n_images = 2
        elif kind == "long":
            text = " ".join(["colour"] * 3000)
        return Example(f"{kind}-s{step}-{k}", messages(img, text, n_images), answer="red")

    def kinds(self, step: int) -> list[str]:
        if self.all_broken:
            return ["truncated"] * 4
        return {1: ["good", "zero", "good", "truncated"], 2: ["huge", "good", "two", "good"],
                3: ["good", "long", "good", "good"]}.get(step, ["good"] * 4)

    def train_examples(self, step: int, n: int) -> list[Example]:
        return [self._example(step, k, kind) for k, kind in enumerate(self.kinds(step)[:n])]

    def eval_examples(self, n: int) -> list[Example]:
        return self.train_examples(99, n)

    def score(self, example: Example, completion: str) -> Score:
        return Score(float("red" in completion.lower()))


class NoRejoin:
    """A weight sink that must never be asked to re-join (a refused request is no restart)."""

    def sync(self, named_tensors: Any, version: int, **kw: Any) -> None:
        pass

    def reconnect(self, timeout_s: float | None = None) -> None:
        raise AssertionError("a 4xx made the trainer re-join the server")


def _trainer(tiny_model_dir: Path, client: RolloutClient, env: Environment, run_dir: Path, lines: list[str],
             weight_sync: Any = None, **cfg: Any) -> MultimodalGRPOTrainer:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    config = tiny_cfg(**{"max_steps": 3, "batch_size": 8, "micro_batch_size": 8, "rollouts_per_step": 2, **cfg})
    return MultimodalGRPOTrainer(model, processor, adapter_for(model.config, processor=processor, max_length=1024),
                                 config, env=env, rollout_source=client, run_dir=run_dir, log=lines.append,
                                 weight_sync=weight_sync)


def test_a_run_drops_examples_with_broken_images_and_completes(server: ServerProc, tiny_model_dir: Path,
                                                              banned: list[int], tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    lines: list[str] = []
    with RolloutClient(server.url, banned_ids=banned, max_concurrent=4) as client:
        tr = _trainer(tiny_model_dir, client, BrokenImagesEnv(media), tmp_path / "run", lines)
        history = tr.train()
    assert [m["step"] for m in history] == [1, 2, 3] and tr.step == 3
    rd = RunDirectory(tmp_path / "run")
    metrics = list(read_jsonl(rd.metrics))
    assert [m[rec.EXAMPLES_DROPPED] for m in metrics] == [2, 2, 1]
    assert [m[rec.NUM_ROLLOUTS] for m in metrics] == [4, 4, 6]
    raw = [json.loads(ln) for ln in rd.rollouts.read_text().splitlines()]  # every line is whole JSON
    drops = [d for d in map(DropRecord.from_json, raw) if d is not None]
    kept = [RolloutRecord.from_json(d) for d in raw if DropRecord.from_json(d) is None]
    assert len(kept) == 14 and all(r.images for r in kept)
    by_id = {d.example_id: d for d in drops}
    assert sorted(by_id) == ["huge-s2-0", "long-s3-1", "truncated-s1-3", "two-s2-2", "zero-s1-1"]
    expect = {  # example -> (step, group, index, code, words of the reason)
        "zero-s1-1": (1, 1, 2, "invalid_image", "is a bytes object, not a PIL image"),
        "truncated-s1-3": (1, 3, 6, "invalid_image", "truncated"),
        "huge-s2-0": (2, 0, 0, "image_too_large", "4000x4000"),
        "two-s2-2": (2, 2, 4, "too_many_images", "more than the limit of 1"),
        "long-s3-1": (3, 1, 2, "prompt_too_long", "max_model_len"),
    }
    for ex, (step, group, index, code, words) in expect.items():
        d = by_id[ex]
        assert (d.step, d.group, d.index, d.error_code) == (step, group, index, code), d
        assert words in d.drop_reason, d
        assert any(ln.startswith(f"step {step}: dropped example {ex}: ") and words in ln for ln in lines), lines
    assert {(r.step, r.index) for r in kept}.isdisjoint({(d.step, d.index) for d in drops})
    assert not any("were dropped" in ln for ln in lines)


def test_a_run_that_loses_every_example_stops_after_three_steps(server: ServerProc, tiny_model_dir: Path,
                                                                banned: list[int], tmp_path: Path) -> None:
    media = tmp_path / "media"
    media.mkdir()
    lines: list[str] = []
    with RolloutClient(server.url, banned_ids=banned, max_concurrent=4) as client:
        tr = _trainer(tiny_model_dir, client, BrokenImagesEnv(media, all_broken=True), tmp_path / "run", lines,
                      max_steps=10)
        before = [p.detach().clone() for p in tr.params]
        with pytest.raises(VlmrlError, match=r"3 steps in a row lost every example .*truncated.*environment's "
                                             r"examples are broken"):
            tr.train()
    assert all(torch.equal(a, b) for a, b in zip(before, tr.params)), "a step without rollouts changed the weights"
    rd = RunDirectory(tmp_path / "run")
    metrics = list(read_jsonl(rd.metrics))
    assert [(m["step"], m[rec.NUM_ROLLOUTS], m[rec.EXAMPLES_DROPPED]) for m in metrics] == [(1, 0, 4), (2, 0, 4),
                                                                                           (3, 0, 4)]
    assert len([d for d in read_jsonl(rd.rollouts) if DropRecord.from_json(d)]) == 12
    skipped = [ln for ln in lines if "all 4 examples were dropped: step skipped" in ln]
    assert [ln.split(":")[0] for ln in skipped] == ["step 1", "step 2", "step 3"]


@pytest.mark.parametrize("model, banned_extra, code", [
    ("no-such-model", [], "model_not_found"),
    (None, [10**9], "invalid_value"),  # a banned token id outside the vocabulary: the trainer's set-up
])
def test_a_config_level_4xx_still_stops_the_run(server: ServerProc, tiny_model_dir: Path, banned: list[int],
                                                tmp_path: Path, model: str | None, banned_extra: list[int],
                                                code: str) -> None:
    media = tmp_path / "media"
    media.mkdir()
    lines: list[str] = []
    with RolloutClient(server.url, banned_ids=banned + banned_extra, model=model) as client:
        tr = _trainer(tiny_model_dir, client, BrokenImagesEnv(media), tmp_path / "run", lines, NoRejoin())
        with pytest.raises(RolloutError, match=rf"example 'good-s1-\d': HTTP 4\d\d {code}: ") as e:
            tr.train()
    assert e.value.code == code and tr.step == 0
    assert not list(read_jsonl(RunDirectory(tmp_path / "run").metrics))
    assert not any("dropped example" in ln for ln in lines)


def test_drop_records_parse_apart_and_the_rollouts_pane_lists_them() -> None:
    from vlmrl_tui.panes.rollouts import RolloutStore

    drop = DropRecord(3, 4, 2, "zero-s3-2", "image 1 is a bytes object, not a PIL image", "invalid_image").to_json()
    assert DropRecord.from_json(drop) == DropRecord.from_json(json.loads(json.dumps(drop)))
    with pytest.raises(ValueError):  # a reader of rollout lines refuses it (it has no reward) ...
        RolloutRecord.from_json(drop)
    ok = {"step": 3, "index": 0, "group": 0, "example_id": "good", "prompt": "p", "completion": "red",
          "reward": 1.0}
    assert DropRecord.from_json(ok) is None  # ... and a rollout line is no drop
    store = RolloutStore()
    assert store.add([ok, drop]) == {3}
    assert [r.example_id for r in store.records(3)] == ["good"]
    assert [d.example_id for d in store.drops(3)] == ["zero-s3-2"]
    assert store.drops(4) == []


@pytest.mark.asyncio
async def test_the_dashboard_shows_a_dropped_example_as_a_row_with_its_reason(tmp_path: Path) -> None:
    from tests.test_tui_app import SIZE, loaded, make_app
    from tests.tui_rundir import make_run_dir, screen_text, wait_for

    run_dir = make_run_dir(tmp_path / "fixture")
    step = max(d["step"] for d in read_jsonl(run_dir / "rollouts.jsonl"))
    with open(run_dir / "rollouts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(DropRecord(step, 99, 9, "zero-9", "image 1 is empty", "invalid_image").to_json()) + "\n")
    app = make_app(run_dir)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot, app)
        await pilot.press("3")
        await wait_for(pilot, lambda: app.rollouts.step == step and app.rollouts.store.drops(step),
                       what="the drop")
        await pilot.pause()
        text = screen_text(app)
        assert "dropped: image 1 is empty" in text and "1 dropped" in text
