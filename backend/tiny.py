"""Tiny offline vision-language models: real Hugging Face directories built from scratch.

``build_tiny(family, out_dir)`` writes config, safetensors weights, a tokenizer trained
locally with the ``tokenizers`` library and a processor (image/video processor, tokenizer,
chat template), loadable with ``AutoModelForImageTextToText`` / ``AutoProcessor`` with
``HF_HUB_OFFLINE=1``. Families: qwen3-vl (primary), qwen2.5-vl, qwen2-vl, llava.

With ``warmup=True`` the language model and lm_head are trained briefly on the *format*
of the ``colors`` answer (a colour word, then end of turn) with targets drawn
independently of the image, so RL has a learning signal from step 0 while the model
still scores at chance: it knows what to say, not which colour is which.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from backend.errors import ModelError

#: bump when the output of build_tiny changes (part of the builtin cache key)
BUILDER_VERSION = 1

FAMILIES: tuple[str, ...] = ("qwen3-vl", "qwen2.5-vl", "qwen2-vl", "llava")
#: "tiny": a few hundred thousand parameters (tests, the default job); "small": ~30 M
#: parameters and up to 256 image tokens, where compute dominates a step on CPU (benchmarks)
SIZES: tuple[str, ...] = ("tiny", "small")
SMALL_FAMILIES: tuple[str, ...] = ("qwen3-vl",)

# Special tokens, in id order after the byte-level alphabet and merges.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
LLAVA_SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")

# Upper bound: byte alphabet (256) + merges; training stops earlier (~550) once every corpus
# word is whole, so the vocabulary stays small and all prompt words are single tokens.
TOKENIZER_VOCAB = 640

# Warm-up (FACTS.md: enough to learn the format, not the mapping).
WARMUP_STEPS = 150
WARMUP_BATCH = 16
WARMUP_LR = 1e-3
WARMUP_COLORS = 5  # the colors environment's default num_colors

# Like Qwen3-VL's own template (no default system prompt), minus tool calling/thinking.
# transformers renders with trim_blocks: a newline right after "%}" would vanish, so every
# newline here follows text or "}}".
_QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Same turn format; an image is LLaVA's single <image> placeholder (the processor expands it).
_LLAVA_TEMPLATE = _QWEN_TEMPLATE.replace(
    "<|vision_start|><|image_pad|><|vision_end|>", "<image>"
).replace("<|vision_start|><|video_pad|><|vision_end|>", "")


def _corpus() -> list[str]:
    """Deterministic training text: the prompt vocabulary, with colour words frequent enough
    that byte-level BPE merges each of them into one token (with and without a leading space)."""
    from environments.colors import PALETTE, QUESTION

    base = [
        QUESTION,
        "What color is this image? Answer with one word.",
        "You are a helpful assistant.",
        "system user assistant",
        "The image shows a solid colour. The answer is one word.",
        "How many objects are in the picture? Count them and answer with a number.",
        "Describe the image. Look at the shape, the size and the position of each object.",
        "yes no maybe left right up down top bottom small large square circle triangle",
        "zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9",
        "Picture Video seconds frame move action reward score game player",
        "a an the is are of in on to and or for with this that it be I you we they",
    ]
    lines: list[str] = []
    for _ in range(20):
        lines.extend(base)
    colours = list(PALETTE)
    for i in range(60):
        # every rotation, so each colour also appears after a space (" red" -> one token)
        k = i % len(colours)
        lines.append(" ".join(colours[k:] + colours[:k]))
        lines.extend(colours)
        lines.extend(c.capitalize() for c in colours)
    return lines


def build_tokenizer(special_tokens: tuple[str, ...]) -> Any:
    """A byte-level BPE tokenizer trained on a fixed corpus (no randomness: seed-independent).

    Raises :class:`ModelError` if a colour word is not a single token (the colour task's
    reward and the warm-up rely on it).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from environments.colors import PALETTE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=[],  # added below, after the learnt vocabulary, as in Qwen's tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens])
    for word in PALETTE:
        for text in (word, " " + word):
            ids = tok.encode(text).ids
            if len(ids) != 1:
                raise ModelError(f"tiny tokenizer: colour {text!r} is {len(ids)} tokens, expected 1")
    return tok


def _wrap_tokenizer(tok: Any, family: str) -> Any:
    """The transformers tokenizer around ``tok``, with Qwen's eos/pad conventions."""
    from transformers import PreTrainedTokenizerFast

    extra: dict[str, Any] = {}
    if family == "llava":
        extra["extra_special_tokens"] = {"image_token": "<image>"}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
        **extra,
    )


def _text_kwargs(vocab: int, tok: Any, size: str = "tiny") -> dict[str, Any]:
    small = size == "small"
    return dict(
        vocab_size=vocab,
        hidden_size=512 if small else 128,
        intermediate_size=1536 if small else 256,
        num_hidden_layers=8 if small else 2,
        num_attention_heads=8 if small else 4,
        num_key_value_heads=4 if small else 2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )


def _qwen_ids(tok: Any) -> dict[str, int]:
    c = tok.convert_tokens_to_ids
    return dict(
        image_token_id=c("<|image_pad|>"),
        video_token_id=c("<|video_pad|>"),
        vision_start_token_id=c("<|vision_start|>"),
        vision_end_token_id=c("<|vision_end|>"),
    )


def make_config(family: str, tok: Any, size: str = "tiny") -> Any:
    """The model config for ``family`` at ``size`` (see :data:`SIZES`); ``vocab_size = len(tok)``."""
    _check_size(family, size)
    vocab = len(tok)
    text = _text_kwargs(vocab, tok, size)
    if family == "qwen3-vl":
        from transformers import Qwen3VLConfig

        small = size == "small"
        text.update(
            head_dim=64 if small else 32,
            # mrope sections (t, h, w) sum to head_dim / 2; interleaved like the real checkpoints.
            rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                             "mrope_section": [12, 10, 10] if small else [6, 5, 5], "mrope_interleaved": True},
        )
        if small:  # 256x256 pixels -> 16x16 patches -> 64 image tokens; up to 512x512 -> 256
            vision = dict(depth=6, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=512,
                          num_position_embeddings=1024, deepstack_visual_indexes=[1, 3])
        else:
            vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16,
                          spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=128,
                          num_position_embeddings=256, deepstack_visual_indexes=[0])
        return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    if family in ("qwen2-vl", "qwen2.5-vl"):
        text.update(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
        if family == "qwen2-vl":
            from transformers import Qwen2VLConfig as Cfg

            vision = dict(depth=2, embed_dim=64, hidden_size=128, mlp_ratio=2, num_heads=4, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2)
        else:
            from transformers import Qwen2_5_VLConfig as Cfg  # type: ignore[no-redef]

            vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[1])
        return Cfg(text_config=text, vision_config=vision, tie_word_embeddings=False, **_qwen_ids(tok))
    if family == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

        text.update(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, image_size=32, patch_size=8, projection_dim=64)
        return LlavaConfig(
            vision_config=vision,
            text_config=LlamaConfig(**text),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_seq_length=(32 // 8) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            tie_word_embeddings=False,
        )
    raise ModelError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")


def _check_size(family: str, size: str) -> None:
    if size not in SIZES:
        raise ModelError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    if size == "small" and family not in SMALL_FAMILIES:
        raise ModelError(f"no small {family} model; small models exist for {', '.join(SMALL_FAMILIES)}")


def make_processor(family: str, tokenizer: Any, size: str = "tiny") -> Any:
    """The processor: a ~64x64 image gives a handful of vision tokens (4 for Qwen, 16 for LLaVA);
    the small model takes up to 512x512 pixels (256 image tokens)."""
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, chat_template=_LLAVA_TEMPLATE,
                              patch_size=8, vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    from transformers import Qwen2VLImageProcessor

    patch = 16 if family == "qwen3-vl" else 14
    factor = patch * 2
    # min/max pixels bound the image token count: 64x64 -> 2x2 merged tokens; at most 8x8 (16x16 small).
    pixels = {"shortest_edge": factor * factor, "longest_edge": (factor * (16 if size == "small" else 8)) ** 2}
    ip = Qwen2VLImageProcessor(size=pixels, patch_size=patch, merge_size=2, temporal_patch_size=2)
    if family == "qwen3-vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        vp = Qwen3VLVideoProcessor(size=dict(pixels), patch_size=patch, merge_size=2, temporal_patch_size=2)
        return Qwen3VLProcessor(image_processor=ip, tokenizer=tokenizer, video_processor=vp,
                                chat_template=_QWEN_TEMPLATE)
    from transformers import Qwen2VLVideoProcessor

    vp = Qwen2VLVideoProcessor(size=dict(pixels), patch_size=patch, merge_size=2, temporal_patch_size=2)
    if family == "qwen2-vl":
        from transformers import Qwen2VLProcessor as Proc
    else:
        from transformers import Qwen2_5_VLProcessor as Proc  # type: ignore[no-redef]
    return Proc(image_processor=ip, tokenizer=tokenizer, video_processor=vp, chat_template=_QWEN_TEMPLATE)


def _trainable_text(model: Any) -> list[Any]:
    """Language model + lm_head parameters; the vision tower and projector stay frozen so the
    warm-up cannot learn an image -> answer mapping even by accident."""
    params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return params


def warmup_format(model: Any, processor: Any, seed: int, steps: int = WARMUP_STEPS,
                  batch: int = WARMUP_BATCH, lr: float = WARMUP_LR,
                  log: Callable[[str], None] | None = None) -> list[float]:
    """Teach the answer format of ``colors``: prompt -> random colour word + ``<|im_end|>``.

    The target is drawn uniformly from the env's default colours *independently* of the image,
    so the best the model can do is the marginal: chance accuracy. Returns the loss per step.
    """
    import torch

    from environments.colors import PALETTE, ColorsEnv

    tok = processor.tokenizer
    colours = list(PALETTE)[:WARMUP_COLORS]
    colour_ids = torch.tensor([tok.convert_tokens_to_ids(c) for c in colours])
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    # Its own env seed: prompts never coincide with the env's train/eval splits.
    env = ColorsEnv(num_colors=WARMUP_COLORS, seed=1_000_003 + seed)
    gen = torch.Generator().manual_seed(seed)
    params = _trainable_text(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    for step in range(steps):
        exs = env.train_examples(step, batch)
        texts = [processor.apply_chat_template(e.messages, add_generation_prompt=True, tokenize=False)
                 for e in exs]
        enc = processor(text=texts, images=[e.images for e in exs], return_tensors="pt", padding=True)
        targets = colour_ids[torch.randint(len(colours), (batch,), generator=gen)]
        n = enc["input_ids"].shape[1]
        # Same-size images -> same-length prompts: no padding, so appending two columns is exact.
        suffix = torch.stack([targets, torch.full_like(targets, end_id)], dim=1)
        enc["input_ids"] = torch.cat([enc["input_ids"], suffix], dim=1)
        enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(suffix)], dim=1)
        if "mm_token_type_ids" in enc:
            enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(suffix)], dim=1)
        labels = torch.full_like(enc["input_ids"], -100)
        labels[:, n:] = suffix
        loss = model(**enc, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if log is not None and ((step + 1) % 25 == 0 or step == 0):
            log(f"warm-up step {step + 1}/{steps} loss {losses[-1]:.3f}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def _provenance(family: str, seed: int, warmup: bool, size: str = "tiny") -> dict[str, Any]:
    prov = {"family": family, "seed": seed, "warmup": warmup, "builder_version": BUILDER_VERSION}
    if size != "tiny":  # tiny builds made before sizes existed stay valid
        prov["size"] = size
    return prov


def read_provenance(path: str | Path) -> dict[str, Any] | None:
    """The ``vlmrl_tiny.json`` of a built model directory, or None if absent/unreadable."""
    try:
        return json.loads((Path(path) / "vlmrl_tiny.json").read_text())
    except (OSError, ValueError):
        return None


def _same_build(path: Path, prov: dict[str, Any]) -> bool:
    got = read_provenance(path)
    return got is not None and all(got.get(k) == v for k, v in prov.items())


def build_tiny(family: str, out_dir: str | Path, seed: int = 0, warmup: bool = True,
               progress: bool = False, size: str = "tiny") -> Path:
    """Build a ``family`` model of ``size`` (tiny by default) into ``out_dir`` (atomically) and
    return its path.

    Deterministic for ``seed``. If ``out_dir`` already holds the same build (family, size,
    seed, warm-up, builder version) it is reused; any other non-empty ``out_dir`` is an error.
    """
    if family not in FAMILIES:
        raise ModelError(f"unknown tiny model family {family!r}; choose one of {', '.join(FAMILIES)}")
    _check_size(family, size)
    out = Path(out_dir).expanduser().absolute()
    prov = _provenance(family, seed, warmup, size)
    if out.exists():
        if _same_build(out, prov):
            return out
        if not out.is_dir() or any(out.iterdir()):
            held = read_provenance(out)
            what = f" (it holds another tiny build: {held})" if held else ""
            raise ModelError(f"{out} exists and is not an empty directory{what}; choose another output directory")
    log: Callable[[str], None] | None = (lambda s: print(f"[{size} {family}] {s}", flush=True)) if progress else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    try:
        _build_into(family, tmp, seed, warmup, log, size)
        (tmp / "vlmrl_tiny.json").write_text(json.dumps(prov, indent=2) + "\n")
        try:
            # rename() is atomic and replaces an empty directory; a concurrent builder that won
            # the race leaves a non-empty one, which we accept if it is the same build.
            os.rename(tmp, out)
        except OSError:
            if not _same_build(out, prov):
                raise ModelError(f"{out} appeared while building and is not the same tiny model") from None
    except ModelError:
        raise
    except Exception as e:  # one line for the CLI, the cause kept for debugging
        raise ModelError(f"building tiny {family} model into {out} failed: {type(e).__name__}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log:
        log(f"done in {time.perf_counter() - t0:.1f}s")
    return out


def _build_into(family: str, path: Path, seed: int, warmup: bool, log: Callable[[str], None] | None,
                size: str = "tiny") -> None:
    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    tok = _wrap_tokenizer(build_tokenizer(LLAVA_SPECIAL_TOKENS if family == "llava" else QWEN_SPECIAL_TOKENS),
                          family)
    config = make_config(family, tok, size)
    processor = make_processor(family, tok, size)
    # fork_rng: the caller's global RNG state is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    if log:
        log(f"{type(model).__name__}: {n_params / 1e6:.2f}M parameters, vocab {len(tok)}")
    if warmup:
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            losses = warmup_format(model, processor, seed, log=log)
        if log:
            log(f"warm-up {len(losses)} steps in {time.perf_counter() - t0:.1f}s, final loss {losses[-1]:.3f}")
    end_ids = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    model.generation_config = GenerationConfig(eos_token_id=end_ids, pad_token_id=end_ids[1])
    path.mkdir(parents=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    # safetensors writes 0600 files; a shared cache must be readable like any other file.
    mode = 0o666 & ~_umask()
    for f in path.iterdir():
        f.chmod(mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
