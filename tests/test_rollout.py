"""The rollout client against the real server subprocess, and its retry policy against a scripted HTTP server."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from backend import contract
from backend.rollout import RolloutClient, RolloutError, request_seed, to_openai_messages, wait_for_health
from backend.sampling import banned_token_ids
from environments.base import Environment, Example, Score
from environments.colors import ColorsEnv
from tests.serverproc import ServerProc, encode, forward_logprobs, free_port, load_trainer_side, serving


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    with serving(tmp_path_factory.mktemp("rollout-server"), "tok") as proc:
        yield proc


@pytest.fixture(scope="module")
def trainer_side(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_trainer_side(tiny_model_dir)


def test_collect_returns_scored_rollouts_with_server_logprobs(server: ServerProc, trainer_side: tuple[Any, Any]) -> None:
    model, processor = trainer_side
    banned = banned_token_ids(processor.tokenizer)
    env = ColorsEnv(num_colors=5, image_size=64, noise_fraction=1.0)  # noisy images: PNG must keep every pixel
    examples = env.train_examples(step=5, n=3)
    client = RolloutClient(server.url, banned_ids=banned, max_concurrent=2)
    rollouts = client.collect(env, examples, n=4, temperature=1.0, max_tokens=4, step=5, seed=0)
    assert len(rollouts) == 12
    assert [r.index for r in rollouts] == list(range(12))
    assert [r.group for r in rollouts] == [g for g in range(3) for _ in range(4)]
    for r in rollouts:
        ex = examples[r.group]
        assert r.example_id == ex.id and r.answer == ex.answer and r.step == 5
        assert 1 <= len(r.completion_ids) <= 4 and len(r.completion_ids) == len(r.behavior_logprobs)
        assert not set(r.completion_ids) & set(banned)
        score = env.score(ex, r.completion)
        assert r.reward == score.reward and r.reward_parts == score.parts
        # the images the trainer gets are pixel-identical to the environment's, and sit in the messages
        assert len(r.images) == 1
        assert np.array_equal(np.asarray(r.images[0]), np.asarray(ex.images[0]))
        assert r.messages[0]["content"][0]["image"] is r.images[0]
        assert r.completion == processor.tokenizer.decode(r.completion_ids, skip_special_tokens=True)
    # behaviour logprobs agree with a trainer forward pass on the rollout's own prompt + ids
    for r in rollouts[::3]:
        ref = forward_logprobs(model, encode(processor, r.messages), r.completion_ids, 1.0,
                               client.logit_bias).gather(1, torch.tensor(r.completion_ids)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(r.behavior_logprobs), ref, atol=1e-4, rtol=0)
    again = client.collect(env, examples, n=4, temperature=1.0, max_tokens=4, step=5, seed=0)
    assert [r.completion_ids for r in again] == [r.completion_ids for r in rollouts], "seeded collect is reproducible"


def test_png_roundtrip_sends_rgb_and_keeps_its_pixels() -> None:
    from PIL import Image

    from backend.serve.protocol import to_rgb

    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8), "RGB"),
            Image.fromarray(rng.integers(0, 255, (5, 6, 4), dtype=np.uint8), "RGBA"),
            Image.fromarray(rng.integers(0, 255, (4, 4), dtype=np.uint8), "L")]
    msgs = [{"role": "user", "content": [*({"type": "image", "image": im} for im in imgs),
                                         {"type": "text", "text": "hi"}]}]
    wire, local, back = to_openai_messages(msgs)
    assert [p["type"] for p in wire[0]["content"]] == ["image_url"] * 3 + ["text"]
    assert all(p["image_url"]["url"].startswith("data:image/png;base64,") for p in wire[0]["content"][:3])
    for a, b in zip(imgs, back):  # every mode goes as RGB, the way the processors convert it (test_broken_images)
        assert b.mode == "RGB" and np.array_equal(np.asarray(to_rgb(a)), np.asarray(b))
    assert np.array_equal(np.asarray(imgs[0]), np.asarray(back[0]))
    assert [p["image"] for p in local[0]["content"][:3]] == back


# ---------------------------------------------------------------- a scripted server for retries


class _Scripted(BaseHTTPRequestHandler):
    script: list[int] = []
    calls: list[dict[str, Any]] = []

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == contract.ROUTE_MODELS:
            self._send(200, {"object": "list", "data": [{"id": "scripted"}]})
        else:
            self._send(404, {"error": {"message": "no"}})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        type(self).calls.append(body)
        status = type(self).script.pop(0) if type(self).script else 200
        if status == 200:
            content = [{"token": "red", "logprob": -0.5, "bytes": None, "top_logprobs": []},
                       {"token": "<|im_end|>", "logprob": -0.1, "bytes": None, "top_logprobs": []}]
            choices = [{"index": i, "message": {"role": "assistant", "content": "red"}, "finish_reason": "stop",
                        "logprobs": {"content": content}, "token_ids": [7, 2]} for i in range(body["n"])]
            self._send(200, {"choices": choices, "weight_version": 5})
        elif status == 0:
            self.connection.close()  # drop the connection without an answer
        else:
            self._send(status, {"error": {"message": f"scripted {status}", "type": "x"}})


class _OneColor(Environment):
    id = "one"

    def train_examples(self, step: int, n: int) -> list[Example]:
        return [Example(id=f"ex-{i}", messages=[{"role": "user", "content": "colour?"}], answer="red")
                for i in range(n)]

    def eval_examples(self, n: int) -> list[Example]:
        return self.train_examples(0, n)

    def score(self, example: Example, completion: str) -> Score:
        return Score(float(completion == example.answer), {"exact": float(completion == example.answer)})


@pytest.fixture()
def scripted() -> Iterator[tuple[str, type[_Scripted]]]:
    handler = type("Handler", (_Scripted,), {"script": [], "calls": []})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


def test_5xx_and_dropped_connections_are_retried(scripted: tuple[str, type[_Scripted]]) -> None:
    url, handler = scripted
    handler.script = [503, 0, 502]
    client = RolloutClient(url, banned_ids=[3, 4], retries=3, backoff_s=0.01)
    rollouts = client.collect(_OneColor(), _OneColor().train_examples(0, 1), n=2, max_tokens=3, seed=1)
    assert len(handler.calls) == 4
    assert [r.reward for r in rollouts] == [1.0, 1.0] and rollouts[0].completion_ids == [7, 2]
    body = handler.calls[-1]
    assert body["logit_bias"] == {"3": -100.0, "4": -100.0} and body["n"] == 2 and body["model"] == "scripted"
    assert body["logprobs"] is True and body["return_token_ids"] is True
    assert body["seed"] == request_seed(1, 0, "ex-0")
    assert client.last_weight_version == 5


def test_retries_give_up_with_a_clear_error(scripted: tuple[str, type[_Scripted]]) -> None:
    url, handler = scripted
    handler.script = [500, 500, 500]
    client = RolloutClient(url, banned_ids=[], retries=2, backoff_s=0.01)
    with pytest.raises(RolloutError, match=r"example 'ex-0'.*3 attempts.*scripted 500"):
        client.collect(_OneColor(), _OneColor().train_examples(0, 1), n=1)
    assert len(handler.calls) == 3


def test_4xx_is_not_retried_and_names_the_example(scripted: tuple[str, type[_Scripted]]) -> None:
    url, handler = scripted
    handler.script = [400]
    client = RolloutClient(url, banned_ids=[], retries=3, backoff_s=0.01)
    with pytest.raises(RolloutError, match=r"example 'ex-0'.*HTTP 400.*scripted 400"):
        client.collect(_OneColor(), _OneColor().train_examples(0, 1), n=1)
    assert len(handler.calls) == 1


def test_concurrency_is_bounded(scripted: tuple[str, type[_Scripted]]) -> None:
    url, handler = scripted
    active = {"now": 0, "max": 0}
    lock = threading.Lock()
    orig = handler.do_POST

    def slow_post(self: _Scripted) -> None:
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        time.sleep(0.05)
        try:
            orig(self)
        finally:
            with lock:
                active["now"] -= 1

    handler.do_POST = slow_post  # type: ignore[method-assign]
    client = RolloutClient(url, banned_ids=[], max_concurrent=3)
    rollouts = client.collect(_OneColor(), _OneColor().train_examples(0, 10), n=1)
    assert len(rollouts) == 10 and active["max"] == 3


def test_collects_share_one_keepalive_connection_and_close_ends_the_loop(
        scripted: tuple[str, type[_Scripted]]) -> None:
    url, handler = scripted
    handler.protocol_version = "HTTP/1.1"  # keep-alive
    ports: list[int] = []
    orig = handler.do_POST

    def post(self: _Scripted) -> None:
        ports.append(self.client_address[1])
        orig(self)

    handler.do_POST = post  # type: ignore[method-assign]
    client = RolloutClient(url, banned_ids=[], max_concurrent=1)
    for step in range(3):
        rollouts = client.collect(_OneColor(), _OneColor().train_examples(step, 1), n=1, step=step)
    assert len(ports) == 3 and len(set(ports)) == 1, "three collects, one connection"
    assert rollouts[0].weight_version == 5
    thread = client._thread
    assert thread is not None and thread.is_alive()
    client.close()
    assert not thread.is_alive()
    # a caller with its own event loop still gets rollouts (on a client of its own)
    import asyncio

    assert len(asyncio.run(client.acollect(_OneColor(), _OneColor().train_examples(9, 2), n=1))) == 2
    client.close()


def test_no_server_fails_after_retries_and_health_wait_times_out() -> None:
    port = free_port()
    client = RolloutClient(f"http://127.0.0.1:{port}", banned_ids=[], retries=1, backoff_s=0.01)
    with pytest.raises(RolloutError, match="2 attempts"):
        client.collect(_OneColor(), _OneColor().train_examples(0, 1), n=1)
    t0 = time.monotonic()
    with pytest.raises(RolloutError, match="not healthy after"):
        wait_for_health(f"http://127.0.0.1:{port}", timeout_s=0.5, interval_s=0.1)
    assert time.monotonic() - t0 < 5
