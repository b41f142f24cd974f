"""``vlmrl doctor``'s image-token check: does the server count the prompt as the trainer does?

One example is built from the configured environment (an episode's first prompt for a
multi-turn one), sent to the configured server once (``max_tokens`` 1), and the server's
``usage.prompt_tokens`` is compared with the trainer's processor's count for the very same
messages and images (:func:`backend.tokencheck.prompt_token_mismatch`). A different count
means the two preprocess images differently (another ``max_pixels``, processor config or
chat template): the training would silently score other sequences than were sampled, or
stop with "image features and image tokens do not match".

The check needs a running server: the doctor starts nothing heavy. With no server answering
``/health`` at the configured address (one probe, ``timeout_s``), it is a warning that says
so; start the server (``vlmrl serve CONFIG`` for the hf engine, or a run) and run the doctor
again. It is a check of the full doctor only (it loads the processor: transformers); the
fast preflight of ``vlmrl run`` never calls it, and this module imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

from backend import contract, net
from backend.config import VlmrlConfig
from vlmrl_tui.checks import FAIL, OK, WARN, CheckResult

NAME = "image tokens"
START_FIX = ("start the server (hf engine: `vlmrl serve CONFIG`; or during a run) and run `vlmrl doctor CONFIG` "
             "again to compare its prompt-token count with the trainer's")


def one_prompt(cfg: VlmrlConfig) -> tuple[str, list[dict[str, Any]]]:
    """(example id, HF-format messages) of one prompt of ``cfg``'s environment, as the trainer's
    first step would send it (an episode: its first prompt)."""
    from backend.envs import build_env
    from backend.rollout_types import episode_example_id
    from environments.base import MultiTurnEnvironment

    env = build_env(cfg.env.id, cfg.env.args)
    if isinstance(env, MultiTurnEnvironment):
        seed = env.train_seeds(1, 1)[0]
        return episode_example_id(env.id, seed), list(env.reset(seed).messages)
    ex = env.train_examples(1, 1)[0]
    return ex.id, ex.messages


def _trainer_adapter(cfg: VlmrlConfig) -> Any:
    """The trainer's adapter on its processor (the model's own, as ``backend.train`` loads it)."""
    from transformers import AutoConfig, AutoProcessor

    from backend.adapters import adapter_for
    from backend.models import resolve_model

    path = resolve_model(cfg.model)
    return adapter_for(AutoConfig.from_pretrained(path), cfg.trainer.args.adapter,
                       processor=AutoProcessor.from_pretrained(path))


def _ask(url: str, wire: list[dict[str, Any]], model: str, timeout_s: float) -> tuple[str, int | None]:
    """One chat request of ``wire`` with ``max_tokens`` 1: (served model, ``usage.prompt_tokens``).
    Raises ``httpx.HTTPError`` when the request fails, ``ValueError`` on a refusal."""
    import httpx

    from backend.rollout import usage_prompt_tokens

    with httpx.Client(base_url=url, timeout=timeout_s, trust_env=False) as client:
        try:
            model = str(client.get(contract.ROUTE_MODELS).json()["data"][0]["id"])
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            pass  # the config's name, then
        body = {"model": model, "messages": wire, "n": 1, "max_tokens": 1, "temperature": 0.0}
        r = client.post(contract.ROUTE_CHAT, json=body)
        if r.status_code != 200:
            raise ValueError(f"HTTP {r.status_code}: {net.error_message(r.content)}")
        data = r.json()
    return model, usage_prompt_tokens(data) if isinstance(data, dict) else None


def check_image_tokens(cfg: VlmrlConfig, *, timeout_s: float = 2.0, request_timeout_s: float = 120.0) -> CheckResult:
    """The server's and the trainer's prompt-token counts for one example of ``cfg``'s environment."""
    url = net.http_url(cfg.inference.host, cfg.inference.port)
    probe = net.probe_http(url + contract.ROUTE_HEALTH, timeout_s)
    if not probe.ok:
        return CheckResult(NAME, WARN, f"skipped: no server at {url} ({probe.error})", START_FIX)
    try:
        example_id, messages = one_prompt(cfg)
        from backend.rollout import to_openai_messages

        wire, local, images = to_openai_messages(messages)
    except Exception as e:  # noqa: BLE001 - the environment check reports what is wrong with [env]
        return CheckResult(NAME, WARN, f"skipped: cannot build an example of {cfg.env.id!r}: {e}",
                           "see the environment check")
    import httpx

    try:
        served, server_tokens = _ask(url, wire, cfg.model, request_timeout_s)
    except httpx.HTTPError as e:
        return CheckResult(NAME, WARN, f"skipped: the server at {url} did not answer example {example_id}: "
                           f"{type(e).__name__}: {e}", START_FIX)
    except ValueError as e:
        return CheckResult(NAME, FAIL, f"the server at {url} refused example {example_id}: {e}",
                           "the trainer's requests would fail the same way: fix the server's limits "
                           "([inference.args]) or the environment")
    if server_tokens is None:
        return CheckResult(NAME, WARN, f"the server at {url} ({served}) reports no usage.prompt_tokens: "
                           "the prompt-token counts cannot be compared")
    from backend.errors import VlmrlError
    from backend.tokencheck import describe_images, prompt_token_mismatch, trainer_prompt_tokens

    try:
        adapter = _trainer_adapter(cfg)
        mine, n_img = trainer_prompt_tokens(adapter, local, images)
        problem = prompt_token_mismatch(adapter, local, images, server_tokens, example_id) if mine != server_tokens \
            else None
    except (VlmrlError, OSError, ValueError, TypeError, RuntimeError) as e:
        return CheckResult(NAME, WARN, f"skipped: the trainer's processor of {cfg.model!r} cannot encode example "
                           f"{example_id}: {type(e).__name__}: {e}", "see the model check")
    if problem:
        return CheckResult(NAME, FAIL, f"{problem} (server at {url}, serving {served})",
                           "make the server's image preprocessing match the trainer's processor (same model "
                           "directory and processor config; vLLM: mm_processor_kwargs)")
    return CheckResult(NAME, OK, f"server at {url} and the trainer's processor both count {server_tokens} prompt "
                       f"tokens for example {example_id} ({describe_images(n_img, images)})")
