"""The rollout client: prompts in, scored completions (with behaviour logprobs) out.

:class:`RolloutClient` sends each example once with ``n = rollouts_per_step`` to the
server's OpenAI-compatible chat route (the hf engine or vLLM), at most
``max_concurrent`` requests in flight, and asks for ``logprobs`` and ``return_token_ids``
so the trainer gets the generated ids and their logprobs and never re-tokenises a
completion. Images travel as 8-bit RGB PNG (lossless) in ``data:`` URLs
(:mod:`backend.serve.protocol`); the rollout keeps the images decoded from the very bytes
that were sent, so trainer and server see the same pixels. Connection errors, timeouts and
5xx answers are retried with exponential backoff (a chat completion changes nothing on the
server, so a retry is safe); a 4xx is raised at once as a :class:`RolloutError` naming the
example, with the server's error code. An example at fault itself (a broken or oversized
image, a prompt too long: ``EXAMPLE_ERROR_CODES``) is left out of the step instead
(``StepRollouts.dropped``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import zlib
from typing import Any, Coroutine, Sequence, TypeVar

import httpx
from PIL import Image

from backend import contract
from backend.net import error_message, probe_http
from backend.rollout_types import (Rollout, RolloutError, StepRollouts, Turn, episode_end_reason,
                                   episode_example_id, or_drop)
from backend.sampling import logit_bias_for
from backend.serve.protocol import decode_png, encode_png, error_code, png_data_url
from environments.base import Environment, Example, MultiTurnEnvironment

log = logging.getLogger("vlmrl.rollout")

RETRY_STATUS = frozenset({500, 502, 503, 504})
T = TypeVar("T")


def to_openai_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Image.Image]]:
    """HF-format messages -> (OpenAI messages, HF messages with round-tripped images, images).

    Each image is encoded to PNG once; the returned HF messages and image list hold the
    image decoded from those bytes (identical pixels to what the server decodes).
    """
    wire: list[dict[str, Any]] = []
    local: list[dict[str, Any]] = []
    images: list[Image.Image] = []
    for msg in messages:
        content = msg.get("content")
        if not isinstance(content, list):
            wire.append({"role": msg["role"], "content": content})
            local.append(dict(msg))
            continue
        wparts: list[dict[str, Any]] = []
        lparts: list[dict[str, Any]] = []
        for part in content:
            ptype = part.get("type")
            if ptype == "image":
                img = part["image"]
                k = len(images) + 1
                if not isinstance(img, Image.Image):
                    raise RolloutError(f"image {k} is a {type(img).__name__} object, not a PIL image",
                                       code="invalid_image")
                try:
                    data = encode_png(img)  # loads it: a truncated or empty file fails here
                    back = decode_png(data)
                except Exception as e:  # noqa: BLE001 - whatever PIL raises for a broken image
                    raise RolloutError(f"image {k} cannot be sent: {type(e).__name__}: {e}",
                                       code="invalid_image") from None
                images.append(back)
                wparts.append({"type": "image_url", "image_url": {"url": png_data_url(data)}})
                lparts.append({**part, "image": back})
            elif ptype == "text":
                wparts.append({"type": "text", "text": part["text"]})
                lparts.append(dict(part))
            else:
                raise RolloutError(f"unsupported message part type {ptype!r}")
        wire.append({"role": msg["role"], "content": wparts})
        local.append({**msg, "content": lparts})
    return wire, local, images


def parse_choice(choice: dict[str, Any]) -> tuple[list[int], list[float], str, str]:
    """(token ids, logprobs, text, finish reason) of one choice (hf engine or vLLM)."""
    lp = choice.get("logprobs") or {}
    content = lp.get("content") if isinstance(lp, dict) else None
    if not isinstance(content, list):
        raise RolloutError("server answered without logprobs (it must honour \"logprobs\": true)")
    logprobs = [float(e["logprob"]) for e in content]
    ids = choice.get("token_ids")
    if ids is None:
        # vLLM with --return-tokens-as-token-ids answers "token_id:123" strings instead.
        try:
            ids = [int(str(e["token"]).split("token_id:", 1)[1]) for e in content]
        except (IndexError, ValueError, KeyError):
            raise RolloutError("server answered without token ids (it must honour \"return_token_ids\": true)") from None
    ids = [int(t) for t in ids]
    if len(ids) != len(logprobs):
        raise RolloutError(f"server answered {len(ids)} token ids but {len(logprobs)} logprobs")
    text = (choice.get("message") or {}).get("content") or ""
    return ids, logprobs, text, str(choice.get("finish_reason") or "stop")


def usage_prompt_tokens(data: dict[str, Any]) -> int | None:
    """The server's ``usage.prompt_tokens`` (the templated prompt with its image tokens
    expanded, on the hf engine and on vLLM), or None when it does not say."""
    usage = data.get("usage")
    pt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return pt if isinstance(pt, int) and not isinstance(pt, bool) else None


def next_prompt_estimate(prompt_tokens: int, completion_tokens: int, previous_prompt_tokens: int | None) -> int:
    """Tokens the next turn's prompt will take, from this turn's: the conversation so far plus
    one more observation, as big as the last one was (the first prompt, system message
    included, stands in for it on the first turn: an over-estimate, on the safe side)."""
    if previous_prompt_tokens is None:
        observation = prompt_tokens
    else:
        observation = max(prompt_tokens - previous_prompt_tokens, 0)
    return prompt_tokens + completion_tokens + observation


def request_seed(seed: int | None, step: int, example_id: str) -> int | None:
    """A per-request seed derived from the run seed, the step and the example (stable across runs)."""
    if seed is None:
        return None
    return zlib.crc32(f"{seed}/{step}/{example_id}".encode()) & 0x7FFFFFFF


class RolloutClient:
    """Collects scored rollouts from an inference server.

    ``banned_ids`` are the token ids never to sample (image pads, vision markers, ...),
    sent as ``logit_bias``; the caller gets them from its tokenizer
    (:func:`backend.sampling.banned_token_ids`), the client never loads a model.
    """

    #: the server holds its own copy of the weights: the trainer may ask ahead
    shares_model = False

    def __init__(
        self,
        base_url: str,
        *,
        banned_ids: Sequence[int],
        max_concurrent: int = 128,
        timeout_s: float = 300.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        model: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.logit_bias = logit_bias_for(banned_ids)
        self.max_concurrent = int(max_concurrent)
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.model = model
        self.last_weight_version: int | None = None
        # collect() runs on one long-lived event loop with one keep-alive HTTP client:
        # building an httpx.AsyncClient costs ~28 ms (SSL context) and new connections,
        # paid on every step otherwise.
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None

    def _new_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_concurrent, max_keepalive_connections=self.max_concurrent)
        timeout = httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
        return httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits)

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=loop.run_forever, name="rollout-client", daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    async def _shared_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def close(self) -> None:
        """Close the keep-alive connections and stop the client's loop (safe to call twice)."""
        with self._lock:
            loop, self._loop = self._loop, None
            thread, self._thread = self._thread, None
        if loop is None:
            return

        async def shutdown() -> None:
            client, self._client = self._client, None
            if client is not None:
                await client.aclose()

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5)
        except Exception as e:  # noqa: BLE001 - closing must not mask the caller's error
            log.debug("closing rollout client: %s", e)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=5)
        if not loop.is_running():
            loop.close()

    def __enter__(self) -> "RolloutClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP

    async def _model_name(self, client: httpx.AsyncClient) -> str:
        if self.model is None:
            data = await self._request(client, "GET", contract.ROUTE_MODELS, None, what="listing models")
            try:
                self.model = str(data["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise RolloutError(f"{contract.ROUTE_MODELS} answered no model") from None
        return self.model

    async def _request(self, client: httpx.AsyncClient, method: str, route: str, body: dict[str, Any] | None,
                       *, what: str) -> dict[str, Any]:
        """One request with retries on connection errors, timeouts and 5xx."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = self.backoff_s * (2 ** (attempt - 1)) * (1 + 0.25 * random.random())
                log.warning("%s: %s; retry %d/%d in %.1fs", what, last, attempt, self.retries, delay)
                await asyncio.sleep(delay)
            try:
                r = await client.request(method, route, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code in RETRY_STATUS:
                last = f"HTTP {r.status_code}: {error_message(r.content)}"
                continue
            if r.status_code != 200:
                code = error_code(r.content)
                detail = f"HTTP {r.status_code}{f' {code}' if code else ''}: {error_message(r.content)}"
                raise RolloutError(f"{what}: {detail}", code=code, status=r.status_code, detail=detail)
            try:
                data = r.json()
            except ValueError:
                raise RolloutError(f"{what}: server answered non-JSON") from None
            if not isinstance(data, dict):
                raise RolloutError(f"{what}: server answered {type(data).__name__}, not an object")
            return data
        raise RolloutError(f"{what}: failed after {self.retries + 1} attempts: {last}")

    # ------------------------------------------------------------------ rollouts

    async def _one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, env: Environment, example: Example,
                   group: int, n: int, params: dict[str, Any], step: int, seed: int | None) -> list[Rollout]:
        wire, local, images = await asyncio.to_thread(to_openai_messages, example.messages)
        body = {
            "model": await self._model_name(client),
            "messages": wire,
            "n": n,
            "logprobs": True,
            "return_token_ids": True,
            "logit_bias": self.logit_bias,
            **params,
        }
        rs = request_seed(seed, step, example.id)
        if rs is not None:
            body["seed"] = rs
        async with sem:
            data = await self._request(client, "POST", contract.ROUTE_CHAT, body, what=f"example {example.id!r}")
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != n:
            got = len(choices) if isinstance(choices, list) else 0
            raise RolloutError(f"example {example.id!r}: asked for {n} completions, server answered {got}")
        version = data.get("weight_version")
        version = version if isinstance(version, int) and not isinstance(version, bool) else None
        if version is not None:
            self.last_weight_version = version
        prompt_tokens = usage_prompt_tokens(data)
        out: list[Rollout] = []
        for j, choice in enumerate(sorted(choices, key=lambda c: c.get("index", 0))):
            try:
                ids, lps, text, finish = parse_choice(choice)
            except RolloutError as e:
                raise RolloutError(f"example {example.id!r}: {e}") from None
            score = env.score(example, text)
            out.append(Rollout(
                example_id=example.id, group=group, messages=local, images=images, completion=text,
                completion_ids=ids, behavior_logprobs=lps, finish_reason=finish, reward=float(score.reward),
                reward_parts=dict(score.parts), answer=example.answer, step=step, index=group * n + j,
                weight_version=version, prompt_tokens=prompt_tokens,
            ))
        return out

    async def _episode(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, env: MultiTurnEnvironment,
                       seed: int, group: int, index: int, params: dict[str, Any], step: int,
                       max_context: int | None) -> Rollout:
        """Play one episode of ``seed``: one chat request per turn, the whole conversation each time."""
        example_id = episode_example_id(env.id, seed)
        episode = await asyncio.to_thread(env.reset, seed)  # world generation can take a second
        wire: list[dict[str, Any]] = []
        local: list[dict[str, Any]] = []
        images: list[Image.Image] = []
        turns: list[Turn] = []
        version: int | None = None
        end_reason = "done"
        previous: int | None = None
        while True:
            # only the messages added since the last turn are encoded (each image once)
            w, loc, imgs = await asyncio.to_thread(to_openai_messages, episode.messages[len(local):])
            wire += w
            local += loc
            images += imgs
            body = {"model": await self._model_name(client), "messages": wire, "n": 1, "logprobs": True,
                    "return_token_ids": True, "logit_bias": self.logit_bias, **params}
            what = f"episode {example_id} #{index} turn {len(turns) + 1}"
            async with sem:
                data = await self._request(client, "POST", contract.ROUTE_CHAT, body, what=what)
            choices = data.get("choices")
            if not isinstance(choices, list) or len(choices) != 1:
                raise RolloutError(f"{what}: asked for 1 completion, server answered "
                                   f"{len(choices) if isinstance(choices, list) else 0}")
            try:
                ids, lps, text, finish = parse_choice(choices[0])
            except RolloutError as e:
                raise RolloutError(f"{what}: {e}") from None
            v = data.get("weight_version")
            if isinstance(v, int) and not isinstance(v, bool):
                version = v if version is None else min(version, v)  # the oldest weights that played
                self.last_weight_version = v
            prompt_tokens = usage_prompt_tokens(data)
            prompt_end = len(local)
            tr = await asyncio.to_thread(env.step, episode, text)
            turns.append(Turn.played(prompt_end, text, ids, lps, finish, tr, prompt_tokens))
            if episode.done:
                end_reason = episode_end_reason(env, episode)
                break
            if max_context is not None and prompt_tokens is not None:
                need = next_prompt_estimate(prompt_tokens, len(ids), previous) + int(params.get("max_tokens") or 0)
                if need > max_context:
                    end_reason = "context"
                    final = await asyncio.to_thread(env.truncated, episode)
                    if final is not None:  # scored as it stands (e.g. a rubric that scores at the end)
                        last = turns[-1]
                        last.reward += float(final.reward)
                        for k, v in final.parts.items():
                            last.reward_parts[k] = last.reward_parts.get(k, 0.0) + float(v)
                    log.info("%s: episode ended early: next prompt (~%d tokens with the reply) would exceed "
                             "max_model_len %d", what, need, max_context)
                    break
            previous = prompt_tokens
        w, loc, imgs = await asyncio.to_thread(to_openai_messages, episode.messages[len(local):])
        local += loc
        images += imgs
        return Rollout.from_turns(
            turns, example_id=example_id, group=group, messages=local, images=images, answer=None, step=step,
            index=index, weight_version=version, end_reason=end_reason, summary=dict(env.summary(episode)),
        )

    async def _gather_episodes(self, client: httpx.AsyncClient, env: MultiTurnEnvironment, seeds: Sequence[int],
                               n: int, *, temperature: float, top_p: float, max_tokens: int, step: int,
                               max_context: int | None) -> list[Rollout]:
        params = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        sem = asyncio.Semaphore(self.max_concurrent)  # requests in flight
        playing = asyncio.Semaphore(self.max_concurrent)  # episodes in flight (each holds a game)
        await self._model_name(client)

        async def one(g: int, j: int, seed: int) -> Rollout:
            async with playing:
                return await self._episode(client, sem, env, seed, g, g * n + j, params, step, max_context)

        async def group(g: int, seed: int) -> list[Rollout]:  # one episode failing for its content drops the group
            return await _all_or_none([one(g, j, seed) for j in range(n)])

        return StepRollouts.of(await _all_or_none([or_drop(group(g, s), episode_example_id(env.id, s), g, g * n)
                                                   for g, s in enumerate(seeds)]))

    def collect_episodes(self, env: MultiTurnEnvironment, seeds: Sequence[int], n: int, *,
                         temperature: float = 1.0, top_p: float = 1.0, max_tokens: int = 64, step: int = 0,
                         max_context: int | None = None) -> list[Rollout]:
        """``n`` episodes per seed (a group per seed, in seed order), played concurrently; a
        seed whose episode the server refuses for its content is dropped (``StepRollouts``).

        An episode ends when the game ends, after ``env.max_turns`` replies, or when its
        next prompt would not fit ``max_context`` tokens (``Rollout.end_reason``).
        """

        async def run() -> list[Rollout]:
            return await self._gather_episodes(await self._shared_client(), env, seeds, n, temperature=temperature,
                                               top_p=top_p, max_tokens=max_tokens, step=step,
                                               max_context=max_context)

        return self._on_own_loop(run())

    async def acollect(self, env: Environment, examples: Sequence[Example], n: int, *, temperature: float = 1.0,
                       top_p: float = 1.0, max_tokens: int = 64, step: int = 0, seed: int | None = None) -> list[Rollout]:
        """``n`` scored rollouts per example, grouped by example, in example order (a
        :class:`StepRollouts`: the examples left out for their content are in ``.dropped``).

        For callers with their own event loop: uses an HTTP client of its own for the call.
        """
        async with self._new_client() as client:
            return await self._gather(client, env, examples, n, temperature=temperature, top_p=top_p,
                                      max_tokens=max_tokens, step=step, seed=seed)

    async def _gather(self, client: httpx.AsyncClient, env: Environment, examples: Sequence[Example], n: int, *,
                      temperature: float, top_p: float, max_tokens: int, step: int,
                      seed: int | None) -> list[Rollout]:
        params = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens}
        sem = asyncio.Semaphore(self.max_concurrent)
        await self._model_name(client)
        return StepRollouts.of(await _all_or_none([
            or_drop(self._one(client, sem, env, ex, g, n, params, step, seed), ex.id, g, g * n)
            for g, ex in enumerate(examples)]))

    def collect(self, env: Environment, examples: Sequence[Example], n: int, *, temperature: float = 1.0,
                top_p: float = 1.0, max_tokens: int = 64, step: int = 0, seed: int | None = None) -> list[Rollout]:
        """Blocking :meth:`acollect` on the client's own loop and keep-alive connections
        (callable from any thread, not from inside the client's loop)."""

        async def run() -> list[Rollout]:
            return await self._gather(await self._shared_client(), env, examples, n, temperature=temperature,
                                      top_p=top_p, max_tokens=max_tokens, step=step, seed=seed)

        return self._on_own_loop(run())

    def _on_own_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the client's loop and wait for it (from any thread but that loop's)."""
        fut = asyncio.run_coroutine_threadsafe(coro, self._background_loop())
        try:
            return fut.result()
        except BaseException:
            fut.cancel()  # e.g. Ctrl-C in the caller: stop the requests still in flight
            raise


async def _all_or_none(coros: Sequence[Coroutine[Any, Any, T]]) -> list[T]:
    """Run ``coros`` concurrently; on the first error (or cancellation) cancel the rest and
    wait for them before raising, so no request is left running."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def wait_for_health(base_url: str, timeout_s: float, *, proc: Any = None, interval_s: float = 0.25) -> dict[str, Any]:
    """Poll ``GET /health`` until it answers 200; return its JSON.

    Raises :class:`RolloutError` on timeout, or at once when ``proc`` (a ``Popen``) exits.
    """
    deadline = time.monotonic() + timeout_s
    url = base_url.rstrip("/") + contract.ROUTE_HEALTH
    while True:
        if proc is not None and proc.poll() is not None:
            raise RolloutError(f"server process exited with code {proc.returncode} before {url} was healthy")
        probe = probe_http(url, timeout_s=5.0)
        if probe.ok:
            return probe.json()
        if time.monotonic() > deadline:
            raise RolloutError(f"{url} not healthy after {timeout_s:.0f}s ({probe.error})")
        time.sleep(interval_s)
