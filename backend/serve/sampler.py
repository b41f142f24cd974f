"""The hf engine's sampler: a logits processor that draws each token itself.

It takes the sampling distribution from :func:`backend.sampling.processed_logprobs`
(logits + logit bias, divided by the temperature, log-softmax; temperature 0 means greedy
and its logprobs are those of temperature 1), draws the next token (nucleus filtering for
``top_p < 1``; the model's image and video placeholder tokens can never be drawn, they
would break the next forward pass), records its logprob, and hands ``generate`` a one-hot
score so greedy search keeps exactly that token. It also decides when each row ends.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Collection

import torch
from transformers import LogitsProcessor, StoppingCriteria

from backend.sampling import processed_logprobs
from backend.serve.protocol import SamplingParams

_PLACEHOLDER_ATTRS = ("image_token_id", "video_token_id", "image_token_index", "video_token_index", "audio_token_id")


def placeholder_ids(config: Any) -> frozenset[int]:
    """The model's image/video/audio placeholder token ids (never drawn; counted in prompts)."""
    ids: set[int] = set()
    for cfg in (config, getattr(config, "text_config", None)):
        for attr in _PLACEHOLDER_ATTRS:
            v = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(v, int) and v >= 0:
                ids.add(v)
    return frozenset(ids)


class _Sampler(LogitsProcessor):
    """Logits processor + stopping criterion of one ``generate`` call (see module doc).

    One row per sequence: ``params`` and ``max_tokens`` per row; a row ends at one of
    ``stop_ids``, at a stop string of its params (found in ``decode(ids)``), at its
    ``max_tokens``, or for every row at once when ``abort`` is set.
    """

    def __init__(self, params: list[SamplingParams], max_tokens: list[int], generator: torch.Generator,
                 vocab: int, device: torch.device, *, stop_ids: Collection[int], placeholders: Collection[int],
                 decode: Callable[[list[int]], str], abort: threading.Event) -> None:
        self.params = params
        self.gen = generator
        self.stop_ids = stop_ids
        self.decode = decode
        self.abort = abort
        n = len(params)
        self.temps = [p.temperature for p in params]
        self.greedy = torch.tensor([t == 0.0 for t in self.temps], device=device)
        self.any_sample = not bool(self.greedy.all())
        # (B, 1): greedy rows report the logprobs of temperature 1
        self.div: torch.Tensor | None = None
        if any(t not in (0.0, 1.0) for t in self.temps):
            self.div = torch.tensor([[t if t > 0 else 1.0] for t in self.temps], dtype=torch.float32, device=device)
        self.top_p = None
        if any(p.top_p < 1.0 for p in params):
            self.top_p = torch.tensor([[p.top_p] for p in params], dtype=torch.float32, device=device)
        self.bias = self._bias(params, vocab, device)
        self.max_tokens = list(max_tokens)
        self.stops = [p.stop for p in params]
        self.top_k = max((p.top_logprobs for p in params), default=0)
        self.done = torch.zeros(n, dtype=torch.bool, device=device)
        self.done_list = [False] * n
        self.reason = ["length"] * n
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.lps: list[list[float]] = [[] for _ in range(n)]
        self.tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(n)]
        self.placeholders = [t for t in placeholders if t < vocab]

    @staticmethod
    def _bias(params: list[SamplingParams], vocab: int, device: torch.device) -> torch.Tensor | None:
        """(V,) when every row has the same logit bias, else (B, V); None without any."""
        if not any(p.logit_bias for p in params):
            return None
        first = params[0].logit_bias
        if all(p.logit_bias == first for p in params):
            vec = torch.zeros(vocab, dtype=torch.float32, device=device)
            for k, v in first.items():
                vec[k] = v
            return vec
        mat = torch.zeros(len(params), vocab, dtype=torch.float32, device=device)
        for i, p in enumerate(params):
            for k, v in p.logit_bias.items():
                mat[i, k] = v
        return mat

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        lp = processed_logprobs(scores, self.div if self.div is not None else 1.0, self.bias)  # (B, V)
        masked = lp
        if self.placeholders:
            masked = lp.clone()
            masked[:, self.placeholders] = float("-inf")
        chosen = masked.argmax(dim=-1)
        if self.any_sample:
            probs = masked.exp()
            if self.top_p is not None:
                probs = _nucleus(probs, self.top_p)
            drawn = torch.multinomial(probs, 1, generator=self.gen).squeeze(1)
            chosen = torch.where(self.greedy, chosen, drawn)
        chosen_lp = lp.gather(1, chosen[:, None]).squeeze(1)
        ids = chosen.tolist()
        vals = chosen_lp.tolist()
        top = None
        if self.top_k:
            tv, ti = lp.topk(self.top_k, dim=-1)
            top = (ti.tolist(), tv.tolist())
        for r, (tok, val) in enumerate(zip(ids, vals)):
            if self.done_list[r]:
                continue
            self.ids[r].append(tok)
            self.lps[r].append(val)
            if top is not None:
                k = self.params[r].top_logprobs
                self.tops[r].append(list(zip(top[0][r][:k], top[1][r][:k])))
            if tok in self.stop_ids:
                self._finish(r, "stop")
            elif self.stops[r] and _find_stop(self.decode(self.ids[r]), self.stops[r]) >= 0:
                self._finish(r, "stop")
            elif len(self.ids[r]) >= self.max_tokens[r]:
                self._finish(r, "length")
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out

    def _finish(self, r: int, reason: str) -> None:
        self.done_list[r] = True
        self.done[r] = True
        self.reason[r] = reason

    def stopping(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.abort.is_set():
            for r in range(len(self.params)):
                if not self.done_list[r]:
                    self._finish(r, "abort")
        return self.done.clone()


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the tail outside each row's top-p nucleus (always keeps the top token)."""
    sp, si = probs.sort(dim=-1, descending=True)
    total = sp.sum(dim=-1, keepdim=True)
    cum = sp.cumsum(dim=-1) / total
    drop = (cum - sp / total) >= top_p
    drop[:, 0] = False
    sp = sp.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter_(1, si, sp)


def _find_stop(text: str, stops: list[str]) -> int:
    """Index of the earliest stop string in ``text``, -1 if none."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else -1


class _Criteria(StoppingCriteria):
    """Adapter so the sampler's stop flags act as a transformers StoppingCriteria."""

    def __init__(self, sampler: _Sampler) -> None:
        self.sampler = sampler

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.sampler.stopping(input_ids, scores, **kwargs)
