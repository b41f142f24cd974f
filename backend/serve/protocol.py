"""Parsing and validating OpenAI-style chat requests for the hf engine, and the image wire format.

Everything a client can get wrong is reported as a :class:`~backend.errors.RequestError`
naming the problem (400, or 413 for an image over the pixel limit), before anything
reaches the engine. Messages come back in the Hugging Face processor format: content
parts ``{"type": "image", "image": PIL.Image}`` and ``{"type": "text", "text": ...}``, the
shape the trainer's adapter feeds the same chat template.

Images travel as 8-bit RGB PNG in ``data:`` URLs (:func:`encode_png`, :func:`png_data_url`):
the rollout client converts every image with :func:`to_rgb` before encoding it, and this
server converts whatever it receives the same way, so the processors of the server (hf or
vLLM) and of the trainer all get the same RGB pixels, whatever the image's mode was.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image

from backend.errors import RequestError

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")

MAX_N = 256
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "user", "assistant")
# Fields that change the sampling distribution; the hf engine does not implement them.
_UNSUPPORTED_NONDEFAULT: dict[str, Any] = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,
    "stream": False,
    "tools": None,
    "tool_choice": None,
    "response_format": None,
    "min_tokens": 0,
    "best_of": None,
    "use_beam_search": False,
    "top_k": None,
    "min_p": 0,
}
_TOP_K_OFF = (None, 0, -1)


@dataclass
class MediaLimits:
    """What images a request may carry."""

    max_images: int = 4
    max_image_pixels: int = 4096 * 4096
    allowed_local_media_path: Path | None = None


@dataclass
class SamplingParams:
    """The sampling fields of a chat request, validated."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    return_token_ids: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class ChatRequest:
    """A parsed chat request: HF-format messages, their images, sampling params."""

    messages: list[dict[str, Any]]
    images: list[Image.Image]
    params: SamplingParams
    model: str | None = None


def _bad(message: str, code: str = "invalid_value", status: int = 400) -> RequestError:
    return RequestError(message, status=status, code=code)


def _get_int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _bad(f"'{key}' must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(f"'{key}' must be {rng}, got {v}")
    return v


def _get_float(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(f"'{key}' must be a number, got {v!r}")
    v = float(v)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise _bad(f"'{key}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return v


def parse_sampling(body: dict[str, Any], vocab_size: int) -> SamplingParams:
    """The sampling parameters of ``body`` (OpenAI names plus vLLM's ``return_token_ids``)."""
    for key, neutral in _UNSUPPORTED_NONDEFAULT.items():
        if key in body and body[key] is not None and body[key] != neutral:
            if key == "top_k" and body[key] in _TOP_K_OFF:
                continue
            raise _bad(f"'{key}' is not supported by the hf engine", code="unsupported_parameter")
    n = _get_int(body, "n", 1, 1, MAX_N)
    temperature = _get_float(body, "temperature", 1.0, 0.0, 100.0)
    top_p = _get_float(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    mt_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get_int(body, mt_key, None, 1)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad(f"'seed' must be an integer, got {seed!r}")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise _bad("'seed' is out of range")
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: list[str] = []
    elif isinstance(stop_raw, str):
        stop = [stop_raw]
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = list(stop_raw)
    else:
        raise _bad("'stop' must be a string or a list of strings")
    if any(s == "" for s in stop):
        raise _bad("'stop' strings must not be empty")
    lp = body.get("logprobs", False)
    if lp is None:
        lp = False
    if not isinstance(lp, bool):
        raise _bad(f"'logprobs' must be a boolean, got {lp!r}")
    top_lp = _get_int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) or 0
    if top_lp and not lp:
        raise _bad("'top_logprobs' needs 'logprobs': true")
    bias_raw = body.get("logit_bias") or {}
    if not isinstance(bias_raw, dict):
        raise _bad("'logit_bias' must be an object mapping token ids to biases")
    bias: dict[int, float] = {}
    for k, v in bias_raw.items():
        try:
            tid = int(k)
        except (TypeError, ValueError):
            raise _bad(f"'logit_bias' key {k!r} is not a token id") from None
        if not 0 <= tid < vocab_size:
            raise _bad(f"'logit_bias' token id {tid} is outside the vocabulary (size {vocab_size})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100.0 <= float(v) <= 100.0:
            raise _bad(f"'logit_bias' value for token {tid} must be a number in [-100, 100], got {v!r}")
        bias[tid] = float(v)
    rti = body.get("return_token_ids", False)
    if not isinstance(rti, bool):
        raise _bad(f"'return_token_ids' must be a boolean, got {rti!r}")
    return SamplingParams(
        n=n or 1, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed, stop=stop,
        logprobs=lp, top_logprobs=top_lp, logit_bias=bias, return_token_ids=rti,
    )


def error_code(body: bytes) -> str | None:
    """The ``error.code`` string of an OpenAI-style error body; None when there is none (vLLM
    puts the HTTP status there, a number)."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    code = err.get("code") if isinstance(err, dict) else None
    return code if isinstance(code, str) else None


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB, the way the Qwen/HF processors convert it (``convert_to_rgb``):
    transparency (alpha band, palette or colour key) composited onto white, every other mode
    through PIL's conversion; 16-bit grey is scaled to 8 bits (PIL's conversion clips it, which
    turns most such pictures white). ``ValueError`` for 32-bit integer or float pixels (modes
    ``I``, ``F``): they have no agreed 8-bit scale. Loads ``img`` (a truncated file fails here)."""
    img.load()
    if img.mode in ("I", "F"):
        kind = "integer" if img.mode == "I" else "float"
        raise ValueError(f"mode {img.mode} (32-bit {kind} pixels) has no agreed 8-bit scale: convert the image to "
                         "RGB, L or 16-bit (I;16) first")
    if img.mode in _SIXTEEN_BIT:
        img = img.convert("I").point(lambda v: v / 257 + 0.5).convert("L")  # 0..65535 -> 0..255, rounded
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def encode_png(img: Image.Image) -> bytes:
    """``img`` as the PNG bytes of its :func:`to_rgb` form (lossless from there on)."""
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def png_data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def decode_image_url(url: str, limits: MediaLimits, where: str) -> Image.Image:
    """A ``data:`` URL (or an allowed local path / ``file://`` URL) as a fully loaded PIL image."""
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}: image_url.url must be a non-empty string", code="invalid_image")
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep:
            raise _bad(f"{where}: data URL has no ',' separating header and payload", code="invalid_image")
        if ";base64" not in head:
            raise _bad(f"{where}: data URL must be base64-encoded (data:image/png;base64,...)", code="invalid_image")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise _bad(f"{where}: image data is not valid base64 ({e})", code="invalid_image") from None
        source = "data URL"
        return _open_image(raw, limits, where, source)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise _bad(f"{where}: remote image URLs are not fetched by this server; send a data: URL", code="invalid_image")
    if parsed.scheme == "file":
        path = Path(unquote(parsed.path))
    elif parsed.scheme == "" and url.startswith("/"):
        path = Path(url)
    else:
        raise _bad(f"{where}: unsupported image URL scheme {parsed.scheme!r}", code="invalid_image")
    if limits.allowed_local_media_path is None:
        raise _bad(
            f"{where}: local image paths are not allowed; set inference.args.allowed_local_media_path",
            code="invalid_image",
        )
    root = limits.allowed_local_media_path.resolve()
    real = path.resolve()
    if root != real and root not in real.parents:
        raise _bad(f"{where}: {path} is outside the allowed media path {root}", code="invalid_image")
    try:
        raw = real.read_bytes()
    except OSError as e:
        raise _bad(f"{where}: cannot read {path}: {e.strerror or e}", code="invalid_image") from None
    return _open_image(raw, limits, where, str(path))


def _open_image(raw: bytes, limits: MediaLimits, where: str, source: str) -> Image.Image:
    if not raw:
        raise _bad(f"{where}: image from {source} is empty", code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            w, h = img.size
            if w * h > limits.max_image_pixels:
                raise _bad(
                    f"{where}: image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels} "
                    "(inference.args.max_image_pixels)",
                    code="image_too_large", status=413,
                )
            img.load()  # decodes fully: truncated or corrupt data fails here, not in the engine
    except RequestError:
        raise
    except Image.DecompressionBombError as e:
        raise _bad(f"{where}: image rejected as a decompression bomb ({e})", code="image_too_large", status=413) from None
    except Image.DecompressionBombWarning as e:
        raise _bad(f"{where}: image rejected as a decompression bomb ({e})", code="image_too_large", status=413) from None
    except Image.UnidentifiedImageError:
        raise _bad(f"{where}: image from {source} is not a decodable image", code="invalid_image") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise _bad(f"{where}: image from {source} cannot be decoded (truncated or corrupt: {e})",
                   code="invalid_image") from None
    if img.width < 1 or img.height < 1:
        raise _bad(f"{where}: image has no pixels", code="invalid_image")
    try:
        return to_rgb(img)  # as the client converts it: every processor then sees the same RGB pixels
    except (ValueError, OSError) as e:
        raise _bad(f"{where}: image from {source} (mode {img.mode}) cannot be served: {e}",
                   code="invalid_image") from None


def parse_messages(raw: Any, limits: MediaLimits) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """OpenAI chat messages -> HF processor messages and the images, in order."""
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty list", code="invalid_messages")
    out: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for i, msg in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise _bad(f"{where} must be an object", code="invalid_messages")
        role = msg.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", code="invalid_messages")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise _bad(f"{where}.content must be a string or a list of parts", code="invalid_messages")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"{pw} must be an object", code="invalid_messages")
            ptype = part.get("type")
            if ptype == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise _bad(f"{pw}.text must be a string", code="invalid_messages")
                parts.append({"type": "text", "text": text})
            elif ptype == "image_url":
                iu = part.get("image_url")
                url = iu.get("url") if isinstance(iu, dict) else iu
                if len(images) >= limits.max_images:
                    n_total = _count_images(raw)
                    raise _bad(
                        f"request has {n_total} images, more than the limit of {limits.max_images} per prompt "
                        "(inference.args.limit_mm_per_prompt)",
                        code="too_many_images",
                    )
                img = decode_image_url(url, limits, pw)
                images.append(img)
                parts.append({"type": "image", "image": img})
            else:
                raise _bad(f"{pw}.type {ptype!r} is not supported (use 'text' or 'image_url')",
                           code="invalid_messages")
        out.append({"role": role, "content": parts})
    return out, images


def _count_images(raw: list[Any]) -> int:
    return sum(
        1
        for m in raw
        if isinstance(m, dict) and isinstance(m.get("content"), list)
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image_url"
    )


def parse_chat_request(body: Any, limits: MediaLimits, vocab_size: int) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body."""
    if not isinstance(body, dict):
        raise _bad("request body must be a JSON object")
    params = parse_sampling(body, vocab_size)
    messages, images = parse_messages(body.get("messages"), limits)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string")
    return ChatRequest(messages=messages, images=images, params=params, model=model)
