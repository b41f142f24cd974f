"""Image-token consistency between the inference server and the trainer, on the real tiny model
and the real hf server (subprocesses): the rollouts keep the server's ``usage.prompt_tokens``,
:func:`backend.tokencheck.prompt_token_mismatch` compares it with the trainer's processor,
the trainer checks its first batch, ``vlmrl doctor``'s "image tokens" check asks the server.

Two servers: one that preprocesses as the trainer does (the tiny model itself), and one whose
processor resizes images to a smaller ``max_pixels`` than the trainer's (a copy of the tiny
model whose processor config says ``longest_edge`` = 32*32 pixels): a 64x64 image is 4 image
tokens for the trainer and 1 for that server, so the counts truly differ.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest

from backend.adapters import adapter_for
from backend.config import validate_config
from backend.net import free_port
from backend.rollout import RolloutClient
from backend.rollout_types import Rollout
from backend.sampling import banned_token_ids
from backend.tokencheck import ImageTokenMismatch, check_rollout_tokens, prompt_token_mismatch
from environments import make_env
from environments.base import Environment, Example, Score
from tests.serverproc import ServerProc, load_trainer_side, serving
from tests.tinytrainer import tiny_cfg, tiny_trainer
from vlmrl_tui.doctor import FAIL, OK, WARN, run_checks
from vlmrl_tui.doctor_tokens import check_image_tokens

pytestmark = pytest.mark.timeout(300)

SMALL_MAX_PIXELS = 32 * 32  # the trainer's tiny processor allows 65536 (256*256)
COLORS = {"num_colors": 5, "image_size": 64}
SERVER_ARGS: dict[str, Any] = {"max_model_len": 4096, "limit_mm_per_prompt": {"image": 4}}  # room for an episode


@pytest.fixture(scope="module")
def same(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    """The tiny model served as the trainer loads it."""
    with serving(tmp_path_factory.mktemp("tokens-same"), None, **SERVER_ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def smaller(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[ServerProc]:
    """The tiny model served with a processor whose max_pixels is smaller than the trainer's."""
    tmp = tmp_path_factory.mktemp("tokens-smaller")
    model = tmp / "model"
    shutil.copytree(tiny_model_dir, model)
    path = model / "processor_config.json"
    conf = json.loads(path.read_text())
    assert conf["image_processor"]["size"]["longest_edge"] > SMALL_MAX_PIXELS
    conf["image_processor"]["size"]["longest_edge"] = SMALL_MAX_PIXELS
    path.write_text(json.dumps(conf))
    with serving(tmp, None, model=str(model), **SERVER_ARGS) as proc:
        yield proc


@pytest.fixture(scope="module")
def trainer_side(tiny_model_dir: Path) -> tuple[Any, Any, Any]:
    """(model, processor, adapter) as the trainer builds them."""
    model, processor = load_trainer_side(tiny_model_dir)
    return model, processor, adapter_for(model.config, processor=processor, max_length=1024)


def _collect(server: ServerProc, processor: Any, n_examples: int = 2) -> list[Rollout]:
    env = make_env("colors", COLORS)
    with RolloutClient(server.url, banned_ids=banned_token_ids(processor.tokenizer), max_concurrent=2) as client:
        return client.collect(env, env.train_examples(1, n_examples), n=2, max_tokens=2, step=1)


def _doctor_cfg(server: ServerProc) -> Any:
    return validate_config({"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors", "args": COLORS},
                            "inference": {"port": server.port}})


# ----- a server that preprocesses as the trainer does -----


def test_rollouts_keep_the_servers_count_and_it_is_the_trainers(same: ServerProc,
                                                                 trainer_side: tuple[Any, Any, Any]) -> None:
    _, processor, adapter = trainer_side
    rollouts = _collect(same, processor)
    assert len(rollouts) == 4
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for r in rollouts:
        enc = adapter.encode_prompt(r.messages, r.images)
        # the chat template with the generation prompt, image pads expanded: 4 for a 64x64 image
        assert r.prompt_tokens == enc.length and int((enc.input_ids == image_pad).sum()) == 4
        assert prompt_token_mismatch(adapter, r.messages, r.images, r.prompt_tokens, r.example_id) is None
    assert check_rollout_tokens(adapter, rollouts) is True


def test_the_doctor_check_passes_against_a_consistent_server(same: ServerProc) -> None:
    r = check_image_tokens(_doctor_cfg(same))
    assert r.status == OK, r
    assert f"server at {same.url}" in r.message and "both count 28 prompt tokens" in r.message
    assert "4 image tokens for a 64x64 image" in r.message
    # `vlmrl doctor CONFIG` beside that server: its port is in use by the very server checked,
    # which is worth a warning, not a failure
    checks = {c.name: c for c in run_checks(_doctor_cfg(same))}
    assert checks["image tokens"].status == OK
    port = checks["server port"]
    assert port.status == WARN and "the server the image-token check used" in port.message, port


def test_the_first_training_step_passes_against_a_consistent_server(same: ServerProc, tiny_model_dir: Path) -> None:
    trainer = tiny_trainer(tiny_model_dir, tiny_cfg(max_steps=1))
    with RolloutClient(same.url, banned_ids=trainer.banned_ids, max_concurrent=2) as client:
        trainer.rollout_source = client
        history = trainer.train()
    assert len(history) == 1 and trainer.step == 1 and trainer.tokens_checked


# ----- a server with a smaller max_pixels than the trainer's processor -----


def test_a_smaller_server_max_pixels_is_named_with_both_counts(smaller: ServerProc,
                                                              trainer_side: tuple[Any, Any, Any]) -> None:
    _, processor, adapter = trainer_side
    r = _collect(smaller, processor, n_examples=1)[0]
    mine = adapter.encode_prompt(r.messages, r.images).length
    assert r.prompt_tokens == mine - 3  # 1 image token instead of 4
    msg = prompt_token_mismatch(adapter, r.messages, r.images, r.prompt_tokens, r.example_id)
    assert msg is not None
    assert msg.startswith(f"server counted {r.prompt_tokens} prompt tokens for example {r.example_id}, the "
                          f"trainer's processor counts {mine} (4 image tokens for a 64x64 image")
    assert "preprocess images differently" in msg and "max_pixels/min_pixels" in msg and "chat template" in msg
    with pytest.raises(ImageTokenMismatch, match=re.escape(f"counts {mine} (4 image tokens")):
        check_rollout_tokens(adapter, [r])


def test_the_doctor_check_fails_naming_both_counts(smaller: ServerProc) -> None:
    r = check_image_tokens(_doctor_cfg(smaller))
    assert r.status == FAIL, r
    assert "server counted 25 prompt tokens" in r.message and "the trainer's processor counts 28" in r.message
    assert "max_pixels 65536" in r.message and r.fix


def test_the_first_training_step_stops_with_a_clear_error(smaller: ServerProc, tiny_model_dir: Path) -> None:
    trainer = tiny_trainer(tiny_model_dir, tiny_cfg(max_steps=2))
    before = [p.detach().clone() for p in trainer.params[:3]]
    with RolloutClient(smaller.url, banned_ids=trainer.banned_ids, max_concurrent=2) as client:
        trainer.rollout_source = client
        with pytest.raises(ImageTokenMismatch) as err:
            trainer.train()
    m = re.match(r"server counted (\d+) prompt tokens for example (train-1-\d), the trainer's processor counts "
                 r"(\d+) \(4 image tokens for a 64x64 image", str(err.value))
    assert m and int(m[3]) - int(m[1]) == 3, err.value
    assert trainer.step == 0 and trainer.history == []  # stopped before any update
    assert all((a == p).all() for a, p in zip(before, trainer.params[:3]))


def test_episodes_are_checked_on_their_first_turn(same: ServerProc, smaller: ServerProc,
                                                  trainer_side: tuple[Any, Any, Any]) -> None:
    pytest.importorskip("crafter")
    _, processor, adapter = trainer_side
    env = make_env("crafter", {"episode_length": 2, "size": 64})
    got = {}
    for name, server in (("same", same), ("smaller", smaller)):
        with RolloutClient(server.url, banned_ids=banned_token_ids(processor.tokenizer)) as client:
            (got[name],) = client.collect_episodes(env, env.train_seeds(1, 1), 1, max_tokens=4, step=1)
    assert len(got["same"].turns) == 2 and len(got["same"].images) == 2  # turn 2's prompt holds both frames
    assert got["same"].turns[0].prompt_tokens is not None and got["same"].prompt_tokens is None
    assert check_rollout_tokens(adapter, [got["same"]]) is True
    with pytest.raises(ImageTokenMismatch, match=f"for example {got['smaller'].example_id}, "):
        check_rollout_tokens(adapter, [got["smaller"]])


# ----- no count, no server -----


class _NoUsage(BaseHTTPRequestHandler):
    """An OpenAI-style server that answers without ``usage`` (some servers do)."""

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._send({"object": "list", "data": [{"id": "no-usage"}]})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        content = [{"token": "red", "logprob": -0.5}]
        self._send({"choices": [{"index": i, "message": {"content": "red"}, "finish_reason": "length",
                                 "logprobs": {"content": content}, "token_ids": [7]} for i in range(body["n"])]})


class _Text(Environment):
    id = "text"

    def train_examples(self, step: int, n: int) -> list[Example]:
        return [Example(id=f"t-{i}", messages=[{"role": "user", "content": "colour?"}], answer="red") for i in range(n)]

    def eval_examples(self, n: int) -> list[Example]:
        return self.train_examples(0, n)

    def score(self, example: Example, completion: str) -> Score:
        return Score(float(completion == example.answer), {})


def test_without_usage_the_count_is_none_and_nothing_is_compared(trainer_side: tuple[Any, Any, Any]) -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NoUsage)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        with RolloutClient(f"http://127.0.0.1:{httpd.server_address[1]}", banned_ids=[]) as client:
            rollouts = client.collect(_Text(), _Text().train_examples(0, 1), n=2, max_tokens=1)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [r.prompt_tokens for r in rollouts] == [None, None]
    assert check_rollout_tokens(trainer_side[2], rollouts) is False  # the trainer looks again next step


def test_without_a_server_the_doctor_check_warns_and_starts_nothing(tmp_path: Path) -> None:
    port = free_port()
    cfg = validate_config({"model": "builtin:tiny-qwen3-vl", "env": {"id": "colors"}, "inference": {"port": port},
                           "trainer": {"args": {"output_dir": str(tmp_path / "runs")}}})
    (r,) = [c for c in run_checks(cfg, env={}) if c.name == "image tokens"]
    assert r.status == WARN and r.message.startswith(f"skipped: no server at http://127.0.0.1:{port}")
    assert "vlmrl serve" in (r.fix or "")
    assert not [c for c in run_checks(cfg, fast_only=True, env={}) if c.name == "image tokens"]
