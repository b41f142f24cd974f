"""The tiny offline models: loadable by the Auto classes, deterministic, and at chance on colors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from backend.errors import ModelError
from backend.sampling import banned_token_ids
from environments.colors import PALETTE, ColorsEnv

FAMILIES = ("qwen3-vl", "qwen2.5-vl", "qwen2-vl", "llava")
REPO = Path(__file__).resolve().parents[1]


def _load(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _encode(processor: Any, n: int) -> tuple[list[Any], Any]:
    exs = ColorsEnv().eval_examples(n)
    texts = [processor.apply_chat_template(e.messages, add_generation_prompt=True, tokenize=False) for e in exs]
    enc = processor(text=texts, images=[e.images for e in exs], return_tensors="pt", padding=True)
    return exs, enc


def _generate(model: Any, processor: Any, enc: Any, do_sample: bool, max_new_tokens: int = 4) -> list[str]:
    ban = banned_token_ids(processor.tokenizer)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample, suppress_tokens=ban,
                             **({"temperature": 1.0, "top_k": 0, "top_p": 1.0} if do_sample else {}))
    new = out[:, enc["input_ids"].shape[1]:]
    assert not set(new.flatten().tolist()) & set(ban), "a banned special token was generated"
    return processor.batch_decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_loads_offline_forward_and_generate(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    path = tiny_model_dirs[family]
    assert (path / "model.safetensors").is_file()
    model, processor = _load(path)
    tok = processor.tokenizer
    assert model.config.get_text_config().vocab_size == len(tok)
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e5 < n_params < 5e6, n_params
    if family != "llava":
        # AutoProcessor for the Qwen families needs the video processor section.
        assert "video_processor" in json.loads((path / "processor_config.json").read_text())

    exs, enc = _encode(processor, 3)
    image_token = model.config.image_token_id if family != "llava" else model.config.image_token_index
    n_image_tokens = int((enc["input_ids"][0] == image_token).sum())
    assert 1 <= n_image_tokens <= 16, "a 64x64 image should give a handful of vision tokens"
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (3, enc["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    # The image reaches the model: another image changes the logits of the same text.
    enc2 = dict(enc)
    enc2["pixel_values"] = torch.flip(enc["pixel_values"], dims=[0]) + 0.5
    with torch.no_grad():
        assert not torch.allclose(model(**enc2).logits, logits)
    texts = _generate(model, processor, enc, do_sample=True, max_new_tokens=6)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_colour_words_and_specials(family: str, tiny_model_dirs: dict[str, Path]) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dirs[family])
    tok = processor.tokenizer
    banned = set(banned_token_ids(tok))
    for word in PALETTE:
        for text in (word, " " + word):
            ids = tok.encode(text, add_special_tokens=False)
            assert len(ids) == 1, (text, tok.convert_ids_to_tokens(ids))
            assert ids[0] not in banned
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    specials += ["<image>"] if family == "llava" else [
        "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    for s in specials:
        assert tok.encode(s, add_special_tokens=False) == [tok.convert_tokens_to_ids(s)], s
    assert tok.eos_token == "<|im_end|>"
    # end of turn must stay sampleable, image tokens must not
    assert tok.eos_token_id not in banned
    assert tok.convert_tokens_to_ids(specials[3]) in banned

    img = ColorsEnv().eval_examples(1)[0].images[0]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Hi?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert text.endswith("Hi?<|im_end|>\n<|im_start|>assistant\n")
    enc = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")
    assert "pixel_values" in enc


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_build_is_deterministic_per_seed(tmp_path: Path) -> None:
    from backend.tiny import build_tiny

    a = build_tiny("qwen2-vl", tmp_path / "a", seed=3, warmup=False)
    b = build_tiny("qwen2-vl", tmp_path / "b", seed=3, warmup=False)
    c = build_tiny("qwen2-vl", tmp_path / "c", seed=4, warmup=False)
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert json.loads((a / "vlmrl_tiny.json").read_text()) == {
        "family": "qwen2-vl", "seed": 3, "warmup": False, "builder_version": json.loads(
            (a / "vlmrl_tiny.json").read_text())["builder_version"]}
    # no temp directories left next to the output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


def test_warmup_is_deterministic_and_leaves_vision_alone(tiny_model_dirs: dict[str, Path]) -> None:
    from backend.tiny import warmup_format

    states = []
    for _ in range(2):
        model, processor = _load(tiny_model_dirs["qwen3-vl"])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        losses = warmup_format(model, processor, seed=7, steps=3, batch=4)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and all(not k.startswith("model.visual") for k in changed), sorted(changed)[:5]
        assert any(k.startswith("lm_head") for k in changed)
        states.append((losses, after))
    assert states[0][0] == states[1][0]
    assert all(torch.equal(states[0][1][k], states[1][1][k]) for k in states[0][1])


def test_warm_tiny_model_is_at_chance_on_colors(tiny_model_dir: Path) -> None:
    """Format learnt (one colour word), mapping not learnt (reward near 1/5)."""
    model, processor = _load(tiny_model_dir)
    env = ColorsEnv()
    exs, enc = _encode(processor, 100)
    torch.manual_seed(0)
    results = {}
    for mode in ("greedy", "sample"):
        comps = _generate(model, processor, enc, do_sample=mode == "sample")
        reward = sum(env.score(e, c).reward for e, c in zip(exs, comps)) / len(exs)
        single = sum(c.strip() in PALETTE for c in comps) / len(comps)
        results[mode] = (reward, single, Counter(c.strip() for c in comps))
    for mode, (reward, single, counts) in results.items():
        assert reward <= 0.35, (mode, reward, counts.most_common(5))
        assert single >= 0.85, (mode, single, counts.most_common(5))
    # sampling spreads over the env's colours instead of repeating one answer
    assert len([w for w in results["sample"][2] if w in PALETTE]) >= 4


def test_resolve_builtin_builds_once_and_reuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import backend.tiny as tiny
    from backend import models

    monkeypatch.setenv("VLMRL_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[str] = []
    real = tiny.build_tiny

    def counting(family: str, out_dir: Any, seed: int = 0, warmup: bool = True, progress: bool = False,
                 size: str = "tiny") -> Path:
        calls.append(family)
        assert size == "tiny"
        return real(family, out_dir, seed=seed, warmup=False)  # warm-up is tested elsewhere; keep it fast

    monkeypatch.setattr(tiny, "build_tiny", counting)
    got: list[str] = []
    threads = [threading.Thread(target=lambda: got.append(models.resolve_model("builtin:tiny-qwen2-vl")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    again = models.resolve_model("builtin:tiny-qwen2-vl")
    assert calls == ["qwen2-vl"]
    assert len(set(got)) == 1 and got[0] == again
    assert Path(again) == models.builtin_dir("tiny-qwen2-vl")
    assert Path(again).parent == tmp_path / "cache"
    assert models.model_family(again) == "qwen2-vl"


def test_resolve_paths_and_hub_ids(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    from backend.models import resolve_model

    local = str(tiny_model_dirs["llava"])
    assert resolve_model(local) == local
    with pytest.raises(ModelError, match="no-such-org/no-such-model"):
        resolve_model("no-such-org/no-such-model")
    with pytest.raises(ModelError, match="unknown builtin"):
        resolve_model("builtin:tiny-gpt9")
    with pytest.raises(ModelError, match="no such directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="config.json"):
        resolve_model(str(tmp_path))


def test_load_model_and_processor_and_family(tmp_path: Path, tiny_model_dirs: dict[str, Path]) -> None:
    from backend.models import load_model_and_processor, model_family

    for family, path in tiny_model_dirs.items():
        assert model_family(str(path)) == family
    model, processor = load_model_and_processor(str(tiny_model_dirs["qwen2.5-vl"]), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert model_family(model) == model_family(model.config) == "qwen2.5-vl"
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "qwen3_vl", "text_config": 5}')
    with pytest.raises(ModelError, match="broken") as exc:
        load_model_and_processor(str(broken))
    assert "\n" not in str(exc.value)
    with pytest.raises(ModelError, match="dtype"):
        load_model_and_processor(str(tiny_model_dirs["llava"]), dtype="int3")


def test_build_tiny_refuses_foreign_dir_and_reuses_same(tmp_path: Path,
                                                        tiny_model_factory: Callable[..., Path]) -> None:
    from backend.tiny import build_tiny

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="not an empty directory"):
        build_tiny("llava", other, warmup=False)
    assert (other / "notes.txt").read_text() == "mine"
    with pytest.raises(ModelError, match="unknown tiny model family"):
        build_tiny("gpt9", tmp_path / "x")
    built = tiny_model_factory("llava")
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert build_tiny("llava", built, warmup=False) == built
    assert (built / "model.safetensors").stat().st_mtime_ns == stamp


def test_cli_build_tiny(tmp_path: Path) -> None:
    out = tmp_path / "cli-model"
    proc = subprocess.run(
        [sys.executable, "-m", "vlmrl_tui.cli", "model", "build-tiny", "--family", "qwen2-vl", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warm-up step 150/150" in proc.stdout and f"wrote {out}" in proc.stdout
    assert json.loads((out / "vlmrl_tiny.json").read_text())["warmup"] is True
    # a second build into the same directory with other settings is refused with one line
    bad = subprocess.run(
        [sys.executable, "-m", "vlmrl_tui.cli", "model", "build-tiny", "--family", "llava", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_the_small_model_has_tens_of_millions_of_parameters_and_64_image_tokens_at_256_pixels(
        tmp_path: Path) -> None:
    """builtin:small-qwen3-vl's shape (built without its warm-up here: the weights do not matter)."""
    from PIL import Image

    from backend.errors import ModelError
    from backend.models import BUILTIN_SIZES, BUILTINS, load_model_and_processor
    from backend.tiny import build_tiny

    assert BUILTINS["small-qwen3-vl"] == "qwen3-vl" and BUILTIN_SIZES["small-qwen3-vl"] == "small"
    path = build_tiny("qwen3-vl", tmp_path / "small", warmup=False, size="small")
    model, processor = load_model_and_processor(str(path))
    n = sum(p.numel() for p in model.parameters())
    assert 20e6 <= n <= 50e6, n
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for side, tokens in ((256, 64), (512, 256), (64, 4)):
        img = Image.new("RGB", (side, side), (200, 10, 10))
        msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "colour?"}]}]
        text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        enc = processor(text=[text], images=[[img]], return_tensors="pt")
        assert int((enc["input_ids"] == pad).sum()) == tokens, side
    with torch.no_grad():
        assert model(**enc).logits.shape[-1] == len(processor.tokenizer)
    with pytest.raises(ModelError, match="no small llava model"):
        build_tiny("llava", tmp_path / "nope", size="small")
