"""The ``hf`` engine: transformers ``generate`` in-process, batching concurrent requests.

One generation thread gathers requests (up to ``max_batch_size`` sequences, waiting at
most ``batch_wait_ms`` for more), left-pads them into one batch (a request with ``n > 1``
is its prompt repeated ``n`` times) and runs ``generate`` with a logits processor that
*is* the sampler (:mod:`backend.serve.sampler`): it draws each token from the processed
distribution of :mod:`backend.sampling` and records that token's logprob. So the
reported logprobs are those of the distribution the token was drawn from, and
``generate`` keeps handling the model-specific parts (KV cache, M-RoPE positions,
``mm_token_type_ids``). A request with a ``seed`` runs in a batch of its own with its own
generator, so it is reproducible.

A completion ends with an end-of-turn token (:func:`backend.sampling.end_of_turn_ids`),
a stop string or ``max_tokens``. Token ids and logprobs include every generated token up
to and including the one that ended it (also the EOS token and the token completing a
stop string, as vLLM reports them); the text omits special tokens and is cut before the
stop string.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from backend.errors import RequestError
from backend.sampling import end_of_turn_ids
from backend.serve.protocol import SamplingParams
from backend.serve.hf_updates import WeightUpdates
from backend.serve.sampler import _Criteria, _find_stop, _Sampler, placeholder_ids
from backend.weight_sync.layout import try_flatten
from backend.weight_sync.receiver import WeightReceiver

__all__ = ["Completion", "HFEngine", "Prompt"]

log = logging.getLogger("vlmrl.serve")

#: how much longer than ``batch_wait_ms`` a batch waits for requests still being prepared
GATHER_MORE_S = 0.05

_SEQ_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class Prompt:
    """One tokenised prompt (batch dimension 1) ready for the engine."""

    inputs: dict[str, torch.Tensor]
    prompt_ids: list[int]
    num_image_tokens: int


@dataclass
class Completion:
    """One generated sequence."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class _Job:
    prompt: Prompt
    params: SamplingParams
    future: cf.Future[tuple[list[Completion], int]]
    max_tokens: int
    enqueued: float = field(default_factory=time.monotonic)


class HFEngine(WeightUpdates):
    """A transformers model behind a batching generation thread, with live weight updates."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        model_name: str,
        max_model_len: int,
        max_batch_size: int = 64,
        batch_wait_ms: float = 5.0,
        weight_backend: str = "gloo",
    ) -> None:
        from transformers import GenerationConfig

        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.model_name = model_name
        self.max_model_len = int(max_model_len)
        self.max_batch_size = int(max_batch_size)
        self.batch_wait_s = float(batch_wait_ms) / 1000.0
        self.device = next(model.parameters()).device
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.stop_ids = end_of_turn_ids(tok, model.generation_config)
        self.placeholder_ids = placeholder_ids(model.config)
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        # A clean generation config: the model's own (repetition penalty, top_k, ...) would
        # change the logits before the sampler sees them.
        self.model.generation_config = GenerationConfig(pad_token_id=self.pad_id, eos_token_id=None)
        # Parameters in one flat buffer: weight updates land in place, with no copy.
        self.layout, why_not = try_flatten(model)
        if why_not:
            log.info("not flattening parameters (%s); updates are copied in", why_not)
        self._params = self._param_map(model)
        self._prep_lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._cv = threading.Condition()
        self._pause_reasons: set[str] = set()
        self._running = False
        self._incoming = 0  # requests received, not yet submitted
        self._abort = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gen = torch.Generator(device=self.device)
        self._gen.seed()
        self.weight_version = 0
        self._swap: int | None = None  # a finished update's version, waiting for the running batch
        self.receiver = WeightReceiver(self.load_weights, backend=weight_backend)
        self.updating = False
        self.dirty_reason: str | None = None
        self.ready = False
        self.failure: str | None = None
        self.stats = {"requests": 0, "batches": 0, "sequences": 0, "generated_tokens": 0,
                      "max_requests_per_batch": 0, "max_sequences_per_batch": 0, "errors": 0}

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _param_map(model: Any) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            out[name] = p
        for name, b in model.named_buffers(remove_duplicate=False):
            out.setdefault(name, b)
        return out

    def start(self) -> None:
        """Start the generation thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="hf-generate", daemon=True)
            self._thread.start()

    def warmup(self) -> None:
        """Generate once from a text and an image prompt; the engine is ready only after."""
        from PIL import Image

        img = Image.new("RGB", (64, 64), (200, 30, 30))
        msgs = [
            [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
            [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Colour?"}]}],
        ]
        params = SamplingParams(n=2, temperature=1.0, max_tokens=2)
        for m in msgs:
            prompt = self.prepare(m, [p["image"] for p in m[0]["content"] if p["type"] == "image"])
            self.submit(prompt, params).result(timeout=600)
        self.ready = True

    def stop(self) -> None:
        """Stop the generation thread and leave any weight-sync group."""
        self._stop.set()
        self._abort.set()
        self._queue.put(None)
        with self._cv:
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.receiver.shutdown()

    # ------------------------------------------------------------------ requests

    def prepare(self, messages: list[dict[str, Any]], images: list[Any]) -> Prompt:
        """Tokenise ``messages`` with the chat template (as the trainer's adapter does)."""
        with self._prep_lock:  # fast tokenizers are not safe to share across threads
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            try:
                if images:
                    enc = self.processor(text=[text], images=[list(images)], return_tensors="pt")
                else:
                    enc = self.processor(text=[text], return_tensors="pt")
            except Exception as e:  # noqa: BLE001 - e.g. an image the processor cannot resize
                raise RequestError(f"the processor rejected the prompt: {type(e).__name__}: {e}",
                                   code="invalid_prompt") from e
        inputs = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        ids = inputs["input_ids"][0].tolist()
        n_img = sum(1 for t in ids if t in self.placeholder_ids)
        return Prompt(inputs=inputs, prompt_ids=ids, num_image_tokens=n_img)

    def check_length(self, prompt: Prompt, params: SamplingParams) -> int:
        """The request's max new tokens; ``RequestError`` when it cannot fit ``max_model_len``."""
        plen = len(prompt.prompt_ids)
        img = f" ({prompt.num_image_tokens} of them image tokens)" if prompt.num_image_tokens else ""
        if plen >= self.max_model_len:
            raise RequestError(
                f"prompt is {plen} tokens{img}, but max_model_len is {self.max_model_len}; "
                "shorten the prompt or use fewer/smaller images (prompts are never truncated)",
                code="prompt_too_long",
            )
        room = self.max_model_len - plen
        if params.max_tokens is None:
            return room
        if params.max_tokens > room:
            raise RequestError(
                f"prompt is {plen} tokens{img} and max_tokens is {params.max_tokens}: "
                f"{plen + params.max_tokens} > max_model_len {self.max_model_len}",
                code="prompt_too_long",
            )
        return params.max_tokens

    def submit(self, prompt: Prompt, params: SamplingParams) -> cf.Future[tuple[list[Completion], int]]:
        """Queue a request; the future gives its ``n`` completions and the weight version used."""
        max_tokens = self.check_length(prompt, params)
        if self._stop.is_set():
            raise RuntimeError("engine is shutting down")
        fut: cf.Future[tuple[list[Completion], int]] = cf.Future()
        self._queue.put(_Job(prompt, params, fut, max_tokens))
        return fut

    @contextlib.contextmanager
    def incoming(self) -> Iterator[None]:
        """Around a request from its arrival until :meth:`submit`: the batch being gathered waits for it."""
        with self._cv:
            self._incoming += 1
        try:
            yield
        finally:
            with self._cv:
                self._incoming -= 1

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, tid: int) -> str:
        return self.tokenizer.decode([tid], skip_special_tokens=False)

    # ------------------------------------------------------------------ the loop

    def _gather(self) -> list[_Job]:
        job = self._queue.get()
        if job is None:
            return []
        jobs = [job]
        rows = job.params.n
        deadline = time.monotonic() + self.batch_wait_s
        # Requests already received but still being prepared (processor work, one at a time)
        # join this batch, up to GATHER_MORE_S longer: a step's requests arrive together, and
        # a split costs a whole second generate call.
        latest = deadline + GATHER_MORE_S
        while rows < self.max_batch_size:
            now = time.monotonic()
            left = deadline - now
            if left <= 0 and self._incoming > 0 and now < latest:
                left = min(latest - now, 0.002)
            try:
                nxt = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                if self._incoming > 0 and time.monotonic() < latest:
                    continue
                break
            if nxt is None:
                self._queue.put(None)
                break
            jobs.append(nxt)
            rows += nxt.params.n
        return jobs

    def _batches(self, jobs: list[_Job]) -> Iterable[tuple[list[_Job], torch.Generator]]:
        """Unseeded jobs share batches (up to max_batch_size rows); seeded ones run alone."""
        cur: list[_Job] = []
        rows = 0
        for job in jobs:
            if job.params.seed is not None:
                continue
            if cur and rows + job.params.n > self.max_batch_size:
                yield cur, self._gen
                cur, rows = [], 0
            cur.append(job)
            rows += job.params.n
        if cur:
            yield cur, self._gen
        for job in jobs:
            if job.params.seed is not None:
                g = torch.Generator(device=self.device)
                g.manual_seed(int(job.params.seed) % (2**64))
                yield [job], g

    def _loop(self) -> None:
        while not self._stop.is_set():
            jobs = self._gather()
            if not jobs:
                continue
            for batch, gen in self._batches(jobs):
                with self._cv:
                    while self._pause_reasons and not self._stop.is_set():
                        self._cv.wait()
                    if self._stop.is_set():
                        for j in batch:
                            j.future.set_exception(RuntimeError("engine stopped"))
                        continue
                    self._running = True
                    version = self.weight_version
                try:
                    results = self._generate(batch, gen)
                except Exception as e:  # noqa: BLE001 - fail these requests, keep serving
                    log.exception("generation failed for a batch of %d requests", len(batch))
                    self.stats["errors"] += 1
                    for j in batch:
                        if not j.future.done():
                            j.future.set_exception(e)
                else:
                    for j, comps in zip(batch, results):
                        j.future.set_result((comps, version))
                finally:
                    with self._cv:
                        self._running = False
                        self._apply_swap()  # a staged update finished during this batch
                        self._cv.notify_all()
        # drain: nothing will serve these any more
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None and not job.future.done():
                job.future.set_exception(RuntimeError("engine stopped"))

    def _collate(self, batch: list[_Job]) -> tuple[dict[str, torch.Tensor], list[tuple[_Job, int]]]:
        rows: list[tuple[_Job, int]] = [(job, j) for job in batch for j in range(job.params.n)]
        per_row = [job.prompt.inputs for job, _ in rows]
        width = max(x["input_ids"].shape[1] for x in per_row)
        out: dict[str, torch.Tensor] = {}
        keys = list(per_row[0].keys())
        for x in per_row[1:]:
            keys.extend(k for k in x if k not in keys)
        for key in keys:
            tensors = [x[key] for x in per_row if key in x]
            if key in _SEQ_KEYS:
                if len(tensors) != len(per_row):
                    raise RuntimeError(f"processor output {key!r} missing for some prompts")
                padv = self.pad_id if key == "input_ids" else 0
                padded = []
                for t in tensors:
                    extra = width - t.shape[1]
                    if extra:
                        t = torch.cat([t.new_full((1, extra), padv), t], dim=1)
                    padded.append(t)
                out[key] = torch.cat(padded, dim=0)
            else:
                out[key] = torch.cat(tensors, dim=0)
        return {k: v.to(self.device) for k, v in out.items()}, rows

    def _generate(self, batch: list[_Job], gen: torch.Generator) -> list[list[Completion]]:
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        t0 = time.monotonic()
        inputs, rows = self._collate(batch)
        vocab = self.vocab_size
        sampler = _Sampler([job.params for job, _ in rows], [job.max_tokens for job, _ in rows], gen, vocab,
                           self.device, stop_ids=self.stop_ids, placeholders=self.placeholder_ids,
                           decode=self.decode, abort=self._abort)
        max_new = max(job.max_tokens for job in batch)
        gc = GenerationConfig(
            max_new_tokens=max_new, do_sample=False, num_beams=1, pad_token_id=self.pad_id, eos_token_id=None,
            repetition_penalty=1.0, no_repeat_ngram_size=0, renormalize_logits=False, use_cache=True,
        )
        with torch.inference_mode():
            self.model.generate(
                **inputs, generation_config=gc, logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([_Criteria(sampler)]),
            )
        self.stats["batches"] += 1
        self.stats["requests"] += len(batch)
        self.stats["sequences"] += len(rows)
        self.stats["generated_tokens"] += sum(len(x) for x in sampler.ids)
        self.stats["max_requests_per_batch"] = max(self.stats["max_requests_per_batch"], len(batch))
        self.stats["max_sequences_per_batch"] = max(self.stats["max_sequences_per_batch"], len(rows))
        results: list[list[Completion]] = [[] for _ in batch]
        index = {id(job): i for i, job in enumerate(batch)}
        for r, (job, _) in enumerate(rows):
            ids = sampler.ids[r]
            text = self.decode(ids)
            if sampler.reason[r] == "stop" and job.params.stop:
                cut = _find_stop(text, job.params.stop)
                if cut >= 0:
                    text = text[:cut]
            results[index[id(job)]].append(Completion(
                token_ids=ids, logprobs=sampler.lps[r], text=text, finish_reason=sampler.reason[r],
                top_logprobs=sampler.tops[r] if job.params.top_logprobs else None,
            ))
        log.debug("batch of %d requests / %d sequences in %.3fs", len(batch), len(rows), time.monotonic() - t0)
        return results

    # ------------------------------------------------------------------ pause / weights

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, details): healthy = loaded, warmed up, generating, weights consistent."""
        alive = self._thread is not None and self._thread.is_alive()
        info: dict[str, Any] = {
            "model": self.model_name, "engine": "hf", "device": str(self.device),
            "weight_version": self.weight_version, "paused": self.paused, "updating": self.updating,
            "queued": self._queue.qsize(), "generating": self._running, "stats": dict(self.stats),
        }
        problem = None
        if not self.ready:
            problem = "model loaded, warm-up generation not finished"
        elif not alive:
            problem = "generation thread is not running"
        elif self.dirty_reason:
            problem = f"weights inconsistent: {self.dirty_reason}; a complete weight update is needed"
        info["status"] = "ok" if problem is None else "unavailable"
        if problem:
            info["reason"] = problem
        return problem is None, info
