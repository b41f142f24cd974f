"""Helpers for tests that run the real inference server as a subprocess (`vlmrl serve`) and
check its answers against a trainer-style forward pass."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

import httpx
import tomli_w
import torch
from PIL import Image

from backend import contract
from backend.net import free_port
from backend.rollout import wait_for_health
from backend.sampling import bias_vector, processed_logprobs


def write_config(path: Path, *, port: int, model: str = "builtin:tiny-qwen3-vl", **inference_args: Any) -> Path:
    """A minimal config for the hf engine on CPU, one torch thread."""
    args = {"max_model_len": 1024, "limit_mm_per_prompt": {"image": 1}, "dtype": "float32", **inference_args}
    data = {
        "model": model,
        "env": {"id": "colors", "args": {"num_colors": 5, "image_size": 64}},
        "inference": {"engine": "hf", "gpus": 0, "host": "127.0.0.1", "port": port, "args": args},
        "trainer": {"args": {"torch_threads": 1, "batch_size": 8, "micro_batch_size": 8, "rollouts_per_step": 4}},
    }
    path.write_text(tomli_w.dumps(data))
    return path


class ServerProc:
    """`vlmrl serve CONFIG` in its own process group; output goes to ``log_path``."""

    def __init__(self, config: Path, port: int, log_path: Path, token: str | None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.token = token
        env = dict(os.environ)
        env.pop(contract.ENV_RUN_TOKEN, None)
        if token is not None:
            env[contract.ENV_RUN_TOKEN] = token
        env["OMP_NUM_THREADS"] = "1"
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vlmrl_tui.cli", "serve", str(config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )

    def wait_healthy(self, timeout_s: float = 180.0) -> dict[str, Any]:
        try:
            return wait_for_health(self.url, timeout_s, proc=self.proc)
        except Exception:
            self.stop()
            raise RuntimeError(f"server did not become healthy; log:\n{self.log()}") from None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        return self.proc.returncode


@contextmanager
def serving(tmp: Path, token: str | None, **inference_args: Any) -> Iterator[ServerProc]:
    """A healthy ``vlmrl serve`` of the tiny model on a free port for the ``with`` block;
    it must exit cleanly (code 0) when stopped."""
    port = free_port()
    proc = ServerProc(write_config(tmp / "cfg.toml", port=port, **inference_args), port, tmp / "server.log", token)
    proc.wait_healthy()
    try:
        yield proc
    finally:
        code = proc.stop()
    assert code == 0, proc.log()


def load_trainer_side(model_dir: Path) -> tuple[Any, Any]:
    """The tiny model (fp32, CPU) and its processor, as the trainer loads them."""
    from backend.models import load_model_and_processor

    return load_model_and_processor(str(model_dir), dtype="float32", device="cpu")


def png_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        parts = []
        for p in m["content"]:
            if p["type"] == "image":
                parts.append({"type": "image_url", "image_url": {"url": png_url(p["image"])}})
            else:
                parts.append({"type": "text", "text": p["text"]})
        out.append({"role": m["role"], "content": parts})
    return out


def encode(processor: Any, messages: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The prompt as the trainer's adapter encodes it."""
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    images = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    if images:
        return dict(processor(text=[text], images=[images], return_tensors="pt"))
    return dict(processor(text=[text], return_tensors="pt"))


def forward_logprobs(model: Any, enc: dict[str, torch.Tensor], completion: list[int], temperature: float,
                     logit_bias: dict[str, float] | None) -> torch.Tensor:
    """Processed logprobs of ``completion`` from one trainer-style forward pass, shape (T, V)."""
    prompt_len = enc["input_ids"].shape[1]
    ids = torch.cat([enc["input_ids"], torch.tensor([completion])], dim=1)
    inputs = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    inputs["input_ids"] = ids
    inputs["attention_mask"] = torch.ones_like(ids)
    if "mm_token_type_ids" in enc:
        mm = enc["mm_token_type_ids"]
        inputs["mm_token_type_ids"] = torch.cat([mm, mm.new_zeros((1, len(completion)))], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits[0, prompt_len - 1 : prompt_len - 1 + len(completion)]
    vec = bias_vector(logit_bias, logits.shape[-1])
    return processed_logprobs(logits, temperature if temperature > 0 else 1.0, vec)


def greedy(server: ServerProc, messages: list[dict[str, Any]], bias: dict[str, float]) -> tuple[list[int], list[float]]:
    body = {"messages": wire_messages(messages), "temperature": 0.0, "max_tokens": 6, "logprobs": True,
            "return_token_ids": True, "logit_bias": bias}
    r = httpx.post(server.url + contract.ROUTE_CHAT, json=body, timeout=60)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    return c["token_ids"], [e["logprob"] for e in c["logprobs"]["content"]]


def assert_server_follows(model: Any, processor: Any, server: ServerProc, examples: list[Any],
                          bias: dict[str, float]) -> list[list[int]]:
    """The server's greedy ids are the model's argmax and its logprobs the model's, exactly (fp32)."""
    outs = []
    for ex in examples:
        ids, lps = greedy(server, ex.messages, bias)
        ref = forward_logprobs(model, encode(processor, ex.messages), ids, 0.0, bias)
        assert ids == ref.argmax(-1).tolist()
        # fp32 agreement as torch.testing defines it for float32 (a cached, batched generate and a
        # full forward add in different orders; 1.03e-5 seen on a logprob of -0.93 after a scramble)
        torch.testing.assert_close(torch.tensor(lps), ref.gather(1, torch.tensor(ids)[:, None]).squeeze(1),
                                   atol=1e-5, rtol=1.3e-6)
        outs.append(ids)
    return outs
