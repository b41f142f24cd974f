"""The hf inference server as a real subprocess: completions, logprobs, batching, bad input, auth."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch
from PIL import Image

from backend import contract
from backend.sampling import banned_token_ids, logit_bias_for
from environments.colors import ColorsEnv
from tests.serverproc import ServerProc, encode, forward_logprobs, load_trainer_side, serving, wire_messages

TOKEN = "test-token-123"
MAX_PIXELS = 256 * 256


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    tmp = tmp_path_factory.mktemp("server")
    media = tmp / "media"
    media.mkdir()
    with serving(tmp, TOKEN, max_image_pixels=MAX_PIXELS, batch_wait_ms=30.0,
                 allowed_local_media_path=str(media)) as proc:
        proc.media = media  # type: ignore[attr-defined]
        yield proc


@pytest.fixture(scope="module")
def trainer_side(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_trainer_side(tiny_model_dir)


@pytest.fixture(scope="module")
def bias(trainer_side: tuple[Any, Any]) -> dict[str, float]:
    return logit_bias_for(banned_token_ids(trainer_side[1].tokenizer))


def chat(server: ServerProc, body: dict[str, Any], timeout: float = 60.0) -> httpx.Response:
    return httpx.post(server.url + contract.ROUTE_CHAT, json=body, timeout=timeout)


def stop_ids(tokenizer: Any) -> set[int]:
    return {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}


def test_health_and_models(server: ServerProc) -> None:
    r = httpx.get(server.url + contract.ROUTE_HEALTH)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = httpx.get(server.url + contract.ROUTE_MODELS).json()
    assert models["data"][0]["id"] == "builtin:tiny-qwen3-vl"


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_image_completions_match_a_forward_pass(server: ServerProc, trainer_side: tuple[Any, Any],
                                                bias: dict[str, float], temperature: float) -> None:
    model, processor = trainer_side
    env = ColorsEnv(num_colors=5, image_size=64)
    for ex in env.train_examples(step=3, n=2):
        n = 3
        body = {"model": "builtin:tiny-qwen3-vl", "messages": wire_messages(ex.messages), "n": n,
                "temperature": temperature, "max_tokens": 6, "logprobs": True, "return_token_ids": True,
                "logit_bias": bias}
        r = chat(server, body)
        assert r.status_code == 200, r.text
        data = r.json()
        enc = encode(processor, ex.messages)
        assert data["prompt_token_ids"] == enc["input_ids"][0].tolist()
        assert len(data["choices"]) == n
        for choice in data["choices"]:
            ids = choice["token_ids"]
            lps = [e["logprob"] for e in choice["logprobs"]["content"]]
            assert 1 <= len(ids) <= 6 and len(ids) == len(lps)
            assert not set(ids) & {int(k) for k in bias}, "a banned token was sampled"
            if choice["finish_reason"] == "stop":
                assert ids[-1] in stop_ids(processor.tokenizer)
            else:
                assert choice["finish_reason"] == "length" and len(ids) == 6
            ref_all = forward_logprobs(model, enc, ids, temperature, bias)
            ref = ref_all.gather(1, torch.tensor(ids)[:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=0)
            if temperature == 0.0:
                assert ids == ref_all.argmax(-1).tolist()
            assert choice["message"]["content"] == processor.tokenizer.decode(ids, skip_special_tokens=True)


def test_nucleus_keeps_the_smallest_top_set() -> None:
    from backend.serve.sampler import _nucleus

    probs = torch.tensor([[0.2, 0.5, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    out = _nucleus(probs, torch.tensor([[0.6], [1.0]]))
    assert out[0].tolist() == pytest.approx([0.0, 0.5, 0.3, 0.0])  # 0.5 < 0.6, so 0.3 joins; then 0.8 >= 0.6
    assert out[1].tolist() == pytest.approx([0.25] * 4)
    assert _nucleus(probs, torch.tensor([[0.01], [0.01]]))[0].tolist() == pytest.approx([0.0, 0.5, 0.0, 0.0])


def test_processed_logprobs_take_a_temperature_and_a_bias_per_row() -> None:
    from backend.sampling import processed_logprobs

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, generator=g)
    temps = [0.7, 1.0, 1.3]
    bias = torch.randn(3, 9, generator=g)  # one row per sequence, longer than the vocabulary
    batched = processed_logprobs(logits, torch.tensor([[t] for t in temps]), bias)
    for r, t in enumerate(temps):
        assert torch.equal(batched[r], processed_logprobs(logits[r], t, bias[r]))
    assert torch.equal(processed_logprobs(logits, 1.0, bias[0]), processed_logprobs(logits, 1.0, bias[0, :7]))


def test_end_of_turn_ids_gather_every_end_token() -> None:
    from backend.sampling import END_OF_TURN_TOKENS, banned_token_ids, end_of_turn_ids

    class Tok:
        vocab = {"<|im_end|>": 5, "<|endoftext|>": 6, "</s>": 7}
        eos_token, eos_token_id, unk_token_id = "</s>", 7, 0
        added_tokens_decoder = {5: None, 6: None, 7: None, 8: None}
        all_special_ids = [5, 6, 7, 8]

        def convert_tokens_to_ids(self, tok: str) -> int:
            return self.vocab.get(tok, self.unk_token_id)

    class GenConfig:
        eos_token_id = [7, 9]

    assert set(END_OF_TURN_TOKENS) == {"<|im_end|>", "<|endoftext|>"}
    assert end_of_turn_ids(Tok(), GenConfig()) == {5, 6, 7, 9}
    assert end_of_turn_ids(Tok()) == {5, 6, 7}
    Tok.vocab = {"</s>": 7}  # no chat tokens: unknown ids are left out
    assert end_of_turn_ids(Tok()) == {7}
    assert banned_token_ids(Tok()) == [5, 6, 8]


def test_tiny_top_p_samples_the_top_token_and_reports_untruncated_logprobs(
        server: ServerProc, trainer_side: tuple[Any, Any], bias: dict[str, float]) -> None:
    model, processor = trainer_side
    ex = ColorsEnv().train_examples(step=2, n=1)[0]
    body = {"messages": wire_messages(ex.messages), "n": 4, "temperature": 1.0, "top_p": 1e-6, "max_tokens": 4,
            "logprobs": True, "return_token_ids": True, "logit_bias": bias}
    data = chat(server, body).json()
    greedy = chat(server, {**body, "n": 1, "temperature": 0.0, "top_p": 1.0}).json()["choices"][0]
    enc = encode(processor, ex.messages)
    for c in data["choices"]:
        assert c["token_ids"] == greedy["token_ids"]
        ref = forward_logprobs(model, enc, c["token_ids"], 1.0, bias)
        lps = torch.tensor([e["logprob"] for e in c["logprobs"]["content"]])
        torch.testing.assert_close(lps, ref.gather(1, torch.tensor(c["token_ids"])[:, None]).squeeze(1),
                                   atol=1e-4, rtol=0)


def test_seeded_requests_are_reproducible(server: ServerProc, bias: dict[str, float]) -> None:
    ex = ColorsEnv().train_examples(step=0, n=1)[0]
    body = {"messages": wire_messages(ex.messages), "n": 4, "temperature": 1.0, "max_tokens": 5, "seed": 1234,
            "logprobs": True, "return_token_ids": True, "logit_bias": bias}
    a, b = chat(server, body).json(), chat(server, body).json()
    assert [c["token_ids"] for c in a["choices"]] == [c["token_ids"] for c in b["choices"]]
    assert [c["logprobs"] for c in a["choices"]] == [c["logprobs"] for c in b["choices"]]
    runs = [tuple(tuple(c["token_ids"]) for c in chat(server, {**body, "seed": s}).json()["choices"])
            for s in range(6)]
    assert len(set(runs)) > 1, "different seeds should give different samples"


def test_stop_string_cuts_text_but_keeps_the_token(server: ServerProc, trainer_side: tuple[Any, Any],
                                                   bias: dict[str, float]) -> None:
    tok = trainer_side[1].tokenizer
    ex = ColorsEnv().train_examples(step=1, n=1)[0]
    body = {"messages": wire_messages(ex.messages), "temperature": 0.0, "max_tokens": 6, "logprobs": True,
            "return_token_ids": True, "logit_bias": bias}
    first = chat(server, body).json()["choices"][0]
    text = first["message"]["content"]
    assert len(text) >= 3, text
    stop = text[1:3]
    got = chat(server, {**body, "stop": [stop, "zzzz"]}).json()["choices"][0]
    assert got["finish_reason"] == "stop"
    assert got["message"]["content"] == text[: text.index(stop)]
    # the ids end with the token that completed the stop string, and they are a prefix of the free run
    assert got["token_ids"] == first["token_ids"][: len(got["token_ids"])]
    assert stop in tok.decode(got["token_ids"]) and stop not in tok.decode(got["token_ids"][:-1])


def test_concurrent_requests_are_batched(server: ServerProc, bias: dict[str, float]) -> None:
    exs = ColorsEnv().train_examples(step=7, n=6)
    before = httpx.get(server.url + contract.ROUTE_HEALTH).json()["stats"]["batches"]

    def one(ex: Any) -> httpx.Response:
        return chat(server, {"messages": wire_messages(ex.messages), "n": 2, "max_tokens": 4, "logit_bias": bias})

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, exs))
    assert all(r.status_code == 200 and len(r.json()["choices"]) == 2 for r in results)
    stats = httpx.get(server.url + contract.ROUTE_HEALTH).json()["stats"]
    assert stats["max_requests_per_batch"] >= 2
    assert stats["batches"] - before < 6, "six concurrent requests should share batches"


def _png_bytes(size: tuple[int, int], color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _image_body(url: str, n_images: int = 1, text: str = "What colour?") -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for _ in range(n_images)]
    parts.append({"type": "text", "text": text})
    return {"messages": [{"role": "user", "content": parts}], "max_tokens": 3}


def _b64(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_bad_input_gets_a_clear_4xx_and_the_server_keeps_serving(server: ServerProc, bias: dict[str, float]) -> None:
    good = _png_bytes((64, 64))
    noise = bytes(range(256)) * 40
    long_text = " ".join(["colour"] * 3000)
    media = server.media  # type: ignore[attr-defined]
    (media / "ok.png").write_bytes(good)
    cases: list[tuple[Any, int, str, str]] = [
        (_image_body("data:image/png;base64,%%%not-base64%%%"), 400, "invalid_image", "base64"),
        (_image_body(_b64(good[: len(good) // 2])), 400, "invalid_image", "truncated or corrupt"),
        (_image_body(_b64(noise)), 400, "invalid_image", "not a decodable image"),
        (_image_body(_b64(b"")), 400, "invalid_image", "empty"),
        (_image_body(_b64(_png_bytes((300, 300)))), 413, "image_too_large", "over the limit"),
        (_image_body(_b64(good), n_images=2), 400, "too_many_images", "more than the limit of 1"),
        (_image_body(_b64(good), text=long_text), 400, "prompt_too_long", "max_model_len"),
        ({**_image_body(_b64(good)), "max_tokens": 5000}, 400, "prompt_too_long", "max_model_len"),
        (_image_body("https://example.com/cat.png"), 400, "invalid_image", "remote image URLs"),
        (_image_body("/etc/passwd"), 400, "invalid_image", "outside the allowed media path"),
        ({**_image_body(_b64(good)), "n": 0}, 400, "invalid_value", "'n'"),
        ({**_image_body(_b64(good)), "temperature": -1}, 400, "invalid_value", "'temperature'"),
        ({**_image_body(_b64(good)), "logit_bias": {"999999": -100}}, 400, "invalid_value", "outside the vocabulary"),
        ({**_image_body(_b64(good)), "stream": True}, 400, "unsupported_parameter", "'stream'"),
        ({**_image_body(_b64(good)), "model": "gpt-4"}, 404, "model_not_found", "gpt-4"),
        ({"messages": []}, 400, "invalid_messages", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_messages", "role"),
        ("not json at all", 400, "invalid_json", "not valid JSON"),
    ]
    for body, status, code, phrase in cases:
        if isinstance(body, str):
            r = httpx.post(server.url + contract.ROUTE_CHAT, content=body,
                           headers={"content-type": "application/json"}, timeout=30)
        else:
            r = chat(server, body)
        assert r.status_code == status, (code, r.text)
        err = r.json()["error"]
        assert err["code"] == code and phrase in err["message"], (code, err)
        assert err["type"] == "invalid_request_error"
    # the next request succeeds, and so does an allowed local path
    ok = chat(server, {**_image_body(_b64(good)), "logit_bias": bias})
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] in ("stop", "length")
    ok = chat(server, {**_image_body(str(media / "ok.png")), "logit_bias": bias})
    assert ok.status_code == 200, ok.text
    assert httpx.get(server.url + contract.ROUTE_HEALTH).status_code == 200


def test_text_only_and_top_logprobs(server: ServerProc, trainer_side: tuple[Any, Any], bias: dict[str, float]) -> None:
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4, "temperature": 0.0,
            "logprobs": True, "top_logprobs": 3, "return_token_ids": True, "logit_bias": bias}
    r = chat(server, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    for entry in choice["logprobs"]["content"]:
        tops = entry["top_logprobs"]
        assert len(tops) == 3
        assert tops[0]["logprob"] == pytest.approx(entry["logprob"])  # greedy: the chosen token is the top one
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)


def test_admin_routes_need_the_run_token(server: ServerProc) -> None:
    routes = sorted(contract.ADMIN_ROUTES)
    for route in routes:
        for headers in ({}, {contract.TOKEN_HEADER: "Bearer wrong"}, {contract.TOKEN_HEADER: TOKEN}):
            method = "GET" if route == contract.ROUTE_WEIGHT_INFO else "POST"
            r = httpx.request(method, server.url + route, headers=headers, json={}, timeout=10)
            assert r.status_code == 401, (route, headers, r.text)
            assert r.json()["error"]["type"] == "authentication_error"
    auth = {contract.TOKEN_HEADER: f"Bearer {TOKEN}"}
    info = httpx.get(server.url + contract.ROUTE_WEIGHT_INFO, headers=auth)
    assert info.status_code == 200 and info.json()["weight_version"] == 0
    assert any(p["name"].endswith("embed_tokens.weight") for p in info.json()["parameters"])
    for route in (contract.ROUTE_RESET_PREFIX_CACHE, contract.ROUTE_RESET_ENCODER_CACHE):
        assert httpx.post(server.url + route, headers=auth).status_code == 200
    # pause holds new requests until resume
    assert httpx.post(server.url + contract.ROUTE_PAUSE, headers=auth).status_code == 200
    assert httpx.get(server.url + contract.ROUTE_HEALTH).json()["paused"] is True
    with cf.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(chat, server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        with pytest.raises(cf.TimeoutError):
            fut.result(timeout=0.5)
        assert httpx.post(server.url + contract.ROUTE_RESUME, headers=auth).status_code == 200
        assert fut.result(timeout=30).status_code == 200
    # the weight routes refuse to run out of order, with the token
    r = httpx.post(server.url + contract.ROUTE_UPDATE_WEIGHTS, headers=auth, json={"update_info": {}})
    assert r.status_code == 409
    r = httpx.post(server.url + contract.ROUTE_START_WEIGHT_UPDATE, headers=auth)
    assert r.status_code == 409 and "init_weight_transfer_engine" in r.json()["error"]["message"]


def test_server_without_token_refuses_admin_routes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """In-process app (same code as `vlmrl serve`) started without VLMRL_RUN_TOKEN."""
    from starlette.testclient import TestClient

    from backend.models import load_model_and_processor
    from backend.serve.app import create_app
    from backend.serve.hf_engine import HFEngine
    from backend.serve.protocol import MediaLimits

    model, processor = load_model_and_processor(str(tiny_model_dir))
    engine = HFEngine(model, processor, model_name="m", max_model_len=512)
    engine.start()
    try:
        app = create_app(engine, token=None, limits=MediaLimits(max_images=1))
        with TestClient(app) as client:
            assert client.get(contract.ROUTE_HEALTH).status_code == 503  # not warmed up yet
            engine.warmup()
            assert client.get(contract.ROUTE_HEALTH).status_code == 200
            for headers in ({}, {contract.TOKEN_HEADER: "Bearer anything"}):
                r = client.post(contract.ROUTE_START_WEIGHT_UPDATE, headers=headers)
                assert r.status_code == 401 and r.json()["error"]["code"] == "no_token_configured"
            r = client.post(contract.ROUTE_CHAT, content=json.dumps(
                {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}))
            assert r.status_code == 200
    finally:
        engine.stop()


def test_a_failing_batch_answers_500_and_the_engine_keeps_serving(tiny_model_dir: Path) -> None:
    from starlette.testclient import TestClient

    from backend.models import load_model_and_processor
    from backend.serve.app import create_app
    from backend.serve.hf_engine import HFEngine
    from backend.serve.protocol import MediaLimits

    model, processor = load_model_and_processor(str(tiny_model_dir))
    engine = HFEngine(model, processor, model_name="m", max_model_len=512)
    engine.start()
    real = model.generate
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("simulated device failure")
        return real(*args, **kwargs)

    model.generate = flaky  # type: ignore[method-assign]
    try:
        with TestClient(create_app(engine, token="t", limits=MediaLimits(max_images=1))) as client:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            r = client.post(contract.ROUTE_CHAT, json=body)
            assert r.status_code == 500 and "simulated device failure" in r.json()["error"]["message"]
            r = client.post(contract.ROUTE_CHAT, json=body)
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
            assert engine.stats["errors"] == 1
    finally:
        engine.stop()


def test_a_request_still_being_prepared_joins_the_batch_being_gathered(tiny_model_dir: Path) -> None:
    """A step's requests arrive together but are prepared one at a time: one whose processor
    work outlasts ``batch_wait_ms`` still joins the batch instead of costing a second generate."""
    import threading
    import time

    from backend.models import load_model_and_processor
    from backend.serve.hf_engine import HFEngine
    from backend.serve.protocol import SamplingParams

    model, processor = load_model_and_processor(str(tiny_model_dir))
    engine = HFEngine(model, processor, model_name="m", max_model_len=512, batch_wait_ms=5)
    engine.start()
    try:
        params = SamplingParams(n=1, temperature=1.0, top_p=1.0, max_tokens=2, seed=None, stop=[], logit_bias={})
        prompt = engine.prepare([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], [])
        slow: dict[str, Any] = {}
        preparing = threading.Event()

        def late() -> None:
            with engine.incoming():  # received; its preparation takes 30 ms, six times batch_wait_ms
                preparing.set()
                time.sleep(0.03)
                slow["fut"] = engine.submit(prompt, params)

        t = threading.Thread(target=late)
        t.start()
        preparing.wait(5)
        first = engine.submit(prompt, params)
        t.join(5)
        first.result(60)
        slow["fut"].result(60)
        assert engine.stats["batches"] == 1 and engine.stats["max_requests_per_batch"] == 2, engine.stats
    finally:
        engine.stop()
