"""``MultimodalBatch``, the ``MultimodalAdapter`` interface and the adapter registry.

An adapter turns scored rollouts into the tensors one VLM family's ``forward`` takes.
The prompt is tokenised by the model's own processor (chat template with vision tokens,
image preprocessing); the completion is the server's token ids, appended as they are,
so the trainer never re-tokenises what the policy sampled::

    input_ids   [ prompt (text + image tokens) | completion (server ids) | pad ]
    loss_mask   [ 0 ...                     0  | 1 ...               1  | 0   ]
    behavior_lp [ 0 ...                     0  | server logprobs        | 0   ]

``behavior_logprobs[b, t]`` is the logprob of ``input_ids[b, t]`` given the tokens before
it.

An episode of a multi-turn environment (``Rollout.turns``) is one sequence: the first
prompt, then each model turn's server ids where they were generated, each followed by what
the chat template adds before the next turn (the end of the reply, the next observation
with its images, the next assistant header), tokenised by the processor::

    input_ids   [ prompt 1 | turn 1 ids | obs 2 (+ image tokens) | turn 2 ids | ... | pad ]
    loss_mask   [ 0 ...  0 | 1 ...    1 | 0 ...                0 | 1 ...    1 | ... | 0   ]

An episode longer than ``max_length`` is cut after the last model turn that fits (so
never through an observation's image tokens), with the reason logged; so is one whose
chat template rewrites earlier turns (the sequence would no longer be what was sampled). A rollout that cannot be trained on (empty completion, prompt + completion longer than
``max_length``, image tokens that do not match the images) is dropped with a logged reason
naming its example id: sequences are never truncated, so never cut through image tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch

from backend.rollout_types import Rollout, image_counts

log = logging.getLogger("vlmrl.adapters")


@dataclass(frozen=True)
class DroppedRollout:
    """A rollout left out of a batch, and why."""

    example_id: str
    index: int  # Rollout.index
    reason: str


@dataclass
class MultimodalBatch:
    """Tensors for one forward/backward pass (B sequences, L positions, right-padded)."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 on prompt + completion
    loss_mask: torch.Tensor  # (B, L) float, 1 on completion tokens only
    behavior_logprobs: torch.Tensor  # (B, L) float, 0 where loss_mask is 0
    rewards: torch.Tensor  # (B,) float
    advantages: torch.Tensor  # (B,) float
    pixel_values: torch.Tensor | None = None  # Qwen: (patches, C*T*P*P); LLaVA: (images, C, H, W)
    extra_model_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)  # image_grid_thw, ...
    prompt_lengths: torch.Tensor | None = None  # (B,) long
    image_index: torch.Tensor | None = None  # (images,) long: which distinct image each image slot repeats
    example_ids: list[str] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # Rollout.index of each row
    dropped: list[DroppedRollout] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum().item())

    def to(self, device: torch.device | str) -> "MultimodalBatch":
        """A copy with every tensor on ``device``."""

        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return MultimodalBatch(
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device),
            behavior_logprobs=self.behavior_logprobs.to(device),
            rewards=self.rewards.to(device),
            advantages=self.advantages.to(device),
            pixel_values=mv(self.pixel_values),
            extra_model_kwargs={k: v.to(device) for k, v in self.extra_model_kwargs.items()},
            prompt_lengths=mv(self.prompt_lengths),
            image_index=mv(self.image_index),
            example_ids=list(self.example_ids),
            indices=list(self.indices),
            dropped=list(self.dropped),
        )


class MultimodalAdapter(ABC):
    """Builds :class:`MultimodalBatch` es for one VLM family.

    Subclasses implement :meth:`build_batch`; :meth:`model_inputs` maps a batch to the
    keyword arguments of the model's ``forward`` (override it if the family needs more).
    """

    #: registry name, e.g. "qwen3-vl"
    name: ClassVar[str] = ""
    #: Hugging Face ``config.model_type`` values this adapter serves
    model_types: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def build_batch(self, rollouts: Sequence[Rollout]) -> MultimodalBatch:
        """Rollouts -> one right-padded batch (rollouts that cannot be used are dropped)."""

    def model_inputs(self, batch: MultimodalBatch) -> dict[str, Any]:
        """Keyword arguments for ``model(**kwargs)``."""
        kwargs: dict[str, Any] = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if batch.pixel_values is not None:
            kwargs["pixel_values"] = batch.pixel_values
        kwargs.update(batch.extra_model_kwargs)
        return kwargs

    def forward(self, model: Any, batch: MultimodalBatch, **kwargs: Any) -> Any:
        """``model(**model_inputs(batch), **kwargs)``; families may compute it more cheaply."""
        return model(**self.model_inputs(batch), **kwargs)


@dataclass
class PromptEncoding:
    """A prompt as the processor encodes it."""

    input_ids: torch.Tensor  # (P,) long
    token_kwargs: dict[str, torch.Tensor]  # per-token extras, each (P,), e.g. mm_token_type_ids
    image_kwargs: dict[str, torch.Tensor]  # per-image extras, concatenated along dim 0 across the batch
    num_images: int = 0
    #: an episode's encoding: ``input_ids`` is the whole sequence, model turns included, and
    #: these ``[start, end)`` spans are where the turns' ids sit (in turn order)
    spans: list[tuple[int, int]] | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())


class TemplateMismatch(ValueError):
    """The chat template renders a longer conversation as more than an extension of the shorter one."""


class ProcessorAdapter(MultimodalAdapter):
    """A ``MultimodalAdapter`` on a Hugging Face processor: chat template + images.

    Family subclasses say which processor outputs are per token (padded and extended over
    the completion with zeros) and check that the image tokens match the images.
    """

    #: processor outputs with one value per token
    token_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, processor: Any, *, max_length: int | None = None, model_config: Any = None) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.model_config = model_config
        pad = getattr(self.tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self.tokenizer, "eos_token_id", None)
        self.pad_token_id: int = int(pad) if pad is not None else 0
        # Prompt encodings per step, the last two kept: the trainer's prefetch thread encodes
        # step k+1 (prepare) while step k is being trained from its own.
        self._caches: dict[int | None, dict[tuple[Any, ...], tuple[Any, PromptEncoding | str]]] = {}
        self._encode_lock = threading.Lock()  # one processor, used from the trainer and its prefetch thread

    # --- family hooks -------------------------------------------------------------------------

    def check_images(self, enc: PromptEncoding, n_images: int) -> str | None:
        """A reason to drop the prompt if its image tokens do not match its images, else None."""
        return None

    def image_token_id(self) -> int | None:
        """The id of the token an image expands to (None when the processor names none)."""
        tid = getattr(self.processor, "image_token_id", None)
        token = getattr(self.processor, "image_token", None)
        if tid is None and token is not None:
            tid = self.tokenizer.convert_tokens_to_ids(token)
        return int(tid) if isinstance(tid, int) else None

    # --- encoding -----------------------------------------------------------------------------

    def prompt_text(self, messages: list[dict[str, Any]]) -> str:
        """The prompt as text through the chat template, ending with the assistant header."""
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def check_prompt_text(self, text: str, n_images: int) -> None:
        """Raise ``ValueError`` when the templated prompt cannot hold ``n_images`` images (the
        rollout is then dropped with that reason). Families whose processor does not check it
        themselves override this."""

    def encode_prompt(self, messages: list[dict[str, Any]], images: list[Any]) -> PromptEncoding:
        """Tokenise one prompt with its images (vision tokens expanded by the processor)."""
        return self.encode_text(self.prompt_text(messages), images)

    def encode_text(self, text: str, images: list[Any], *, first: bool = True) -> PromptEncoding:
        """Tokenise templated ``text`` holding ``images`` (``first``: it starts the sequence, so
        the tokenizer's own start tokens, if any, belong in it)."""
        self.check_prompt_text(text, len(images))
        extra: dict[str, Any] = {} if first else {"add_special_tokens": False}
        if images:
            enc = self.processor(text=[text], images=[list(images)], return_tensors="pt", **extra)
        else:
            enc = self.processor(text=[text], return_tensors="pt", **extra)
        ids = enc["input_ids"][0].long()  # (P,)
        token_kwargs = {k: enc[k][0] for k in self.token_keys if k in enc}
        skip = {"input_ids", "attention_mask", *self.token_keys}
        image_kwargs = {k: v for k, v in enc.items() if k not in skip and isinstance(v, torch.Tensor)}
        return PromptEncoding(ids, token_kwargs, image_kwargs, num_images=len(images))

    def episode_pieces(self, r: Rollout) -> list[tuple[str, list[Any]]]:
        """The templated text (and its images) before each model turn of episode ``r``.

        Piece 0 is the first prompt; piece k > 0 is what the template puts between turn k-1's
        reply and turn k's: found by rendering turn k's prompt and taking what follows turn
        k-1's prompt and reply (minus the end-of-turn token the server's ids already end with).
        Raises :class:`TemplateMismatch` at the first turn where that prefix does not hold,
        with ``args[1]`` = the number of turns that can be kept.
        """
        from backend.sampling import end_of_turn_ids

        counts = image_counts(r.messages)
        end_ids = end_of_turn_ids(self.tokenizer)
        pieces: list[tuple[str, list[Any]]] = []
        prev_text = ""
        prev_end = 0
        used = 0
        for k, turn in enumerate(r.turns):
            text = self.prompt_text(r.messages[: turn.prompt_end])
            n_img = sum(counts[prev_end : turn.prompt_end])
            if k == 0:
                piece = text
            else:
                last = r.turns[k - 1]
                head = prev_text + last.completion
                if not text.startswith(head):
                    raise TemplateMismatch(f"the chat template renders turn {k + 1}'s prompt as more than turn "
                                           f"{k}'s prompt and reply", k)
                piece = text[len(head):]
                if last.completion_ids and last.completion_ids[-1] in end_ids:
                    end_text = self.tokenizer.convert_ids_to_tokens(last.completion_ids[-1])
                    if isinstance(end_text, str) and piece.startswith(end_text):
                        piece = piece[len(end_text):]
            pieces.append((piece, list(r.images[used : used + n_img])))
            used += n_img
            prev_text, prev_end = text, turn.prompt_end
        return pieces

    def encode_episode(self, r: Rollout) -> tuple[Rollout, PromptEncoding]:
        """Episode ``r`` as one sequence (see the module docstring), cut after the last turn
        that fits ``max_length``: returns the (possibly cut) rollout and its encoding.
        Raises ``ValueError`` when not even the first turn fits."""
        keep = len(r.turns)
        why = ""
        try:
            pieces = self.episode_pieces(r)
        except TemplateMismatch as e:
            keep = int(e.args[1])
            why = str(e.args[0])
            pieces = self.episode_pieces(dataclasses.replace(r, turns=r.turns[:keep]))
        ids: list[torch.Tensor] = []
        token_parts: dict[str, list[torch.Tensor]] = {}
        image_parts: dict[str, list[torch.Tensor]] = {}
        spans: list[tuple[int, int]] = []
        n_images = 0
        pos = 0
        for k, (text, imgs) in enumerate(pieces):
            enc = self.encode_text(text, imgs, first=k == 0)
            bad = self.check_images(enc, len(imgs))
            if bad:
                raise ValueError(f"turn {k + 1}: {bad}")
            turn_ids = torch.tensor(r.turns[k].completion_ids, dtype=torch.long)
            end = pos + enc.length + turn_ids.numel()
            if self.max_length is not None and end > self.max_length:
                if k == 0:
                    raise ValueError(f"overlong: the first turn alone takes {end} tokens > max_length "
                                     f"{self.max_length}")
                keep = k
                why = f"{end} tokens through turn {k + 1} > max_length {self.max_length}"
                break
            ids += [enc.input_ids, turn_ids]
            for key, v in enc.token_kwargs.items():
                token_parts.setdefault(key, []).extend([v, torch.zeros(turn_ids.numel(), dtype=v.dtype)])
            for key, v in enc.image_kwargs.items():
                image_parts.setdefault(key, []).append(v)
            n_images += len(imgs)
            spans.append((pos + enc.length, end))
            pos = end
        if keep < len(r.turns):
            log.warning("episode %s (#%d) cut after turn %d of %d: %s", r.example_id, r.index, keep,
                        len(r.turns), why)
            r = r.keep_turns(keep, f"cut: {why}")
        enc = PromptEncoding(
            torch.cat(ids), {k: torch.cat(v) for k, v in token_parts.items()},
            {k: torch.cat(v, dim=0) for k, v in image_parts.items()}, num_images=n_images, spans=spans)
        return r, enc

    def _step_cache(self, rollouts: Sequence[Rollout]) -> dict[tuple[Any, ...], tuple[Any, PromptEncoding | str]]:
        """The encodings of the rollouts' step (a fresh dict when they mix steps)."""
        steps = {r.step for r in rollouts}
        if len(steps) != 1:
            return {}
        step = next(iter(steps))
        cache = self._caches.pop(step, None)
        self._caches[step] = cache = {} if cache is None else cache  # the most recently used last
        while len(self._caches) > 2:
            del self._caches[next(iter(self._caches))]
        return cache

    def prepare(self, rollouts: Sequence[Rollout]) -> None:
        """Encode the rollouts' prompts ahead (a step's rollouts as they arrive, off the
        training thread), so that :meth:`validate` and :meth:`build_batch` find them done."""
        self._encode_all(rollouts, quiet=True)

    def _encode_all(
        self, rollouts: Sequence[Rollout], quiet: bool = False
    ) -> tuple[list[tuple[Rollout, PromptEncoding]], list[DroppedRollout]]:
        with self._encode_lock:
            return self._encode_locked(rollouts, quiet)

    def _encode_locked(
        self, rollouts: Sequence[Rollout], quiet: bool
    ) -> tuple[list[tuple[Rollout, PromptEncoding]], list[DroppedRollout]]:
        kept: list[tuple[Rollout, PromptEncoding]] = []
        dropped: list[DroppedRollout] = []
        # Rollouts of a group share a prompt: encode it once per step, across calls.
        cache = self._step_cache(rollouts)

        def drop(r: Rollout, reason: str) -> None:
            dropped.append(DroppedRollout(r.example_id, r.index, reason))
            if not quiet:
                log.warning("dropped rollout %s (#%d): %s", r.example_id, r.index, reason)

        for r in rollouts:
            if not r.completion_ids:
                drop(r, "empty completion")
                continue
            if r.is_episode:
                # an episode is its own prompt; validate() and build_batch() encode it once
                key = ("episode", r.step, r.index, id(r.messages), id(r.turns))
                if key not in cache:
                    try:
                        cache[key] = (r, self.encode_episode(r))
                    except (ValueError, TypeError, RuntimeError) as e:
                        cache[key] = (r, f"episode could not be encoded: {e}")
                got = cache[key][1]
                if isinstance(got, str):
                    drop(r, got)
                else:
                    kept.append(got)
                    cache[("episode", r.step, r.index, id(got[0].messages), id(got[0].turns))] = (got[0], got)
                continue
            # id()s of the (pinned) messages and image objects: the same prompt, not just the same
            # name (the images' list may be a fresh one per rollout, its images are shared)
            key = (r.step, r.example_id, r.group, id(r.messages), *map(id, r.images))
            if key not in cache:
                pin = (r.messages, r.images)
                try:
                    enc = self.encode_prompt(r.messages, r.images)
                    cache[key] = (pin, self.check_images(enc, len(r.images)) or enc)
                except (ValueError, TypeError, RuntimeError) as e:
                    cache[key] = (pin, f"prompt could not be encoded: {type(e).__name__}: {e}")
            enc_or_reason = cache[key][1]
            if isinstance(enc_or_reason, str):
                drop(r, enc_or_reason)
                continue
            total = enc_or_reason.input_ids.numel() + len(r.completion_ids)
            if self.max_length is not None and total > self.max_length:
                drop(
                    r,
                    f"overlong: {enc_or_reason.input_ids.numel()} prompt + {len(r.completion_ids)} completion "
                    f"tokens > max_length {self.max_length}",
                )
                continue
            kept.append((r, enc_or_reason))
        if len(cache) > 4096:  # a caller that never changes step: keep memory bounded
            cache.clear()
        return kept, dropped

    def validate(self, rollouts: Sequence[Rollout]) -> tuple[list[Rollout], list[DroppedRollout]]:
        """Split ``rollouts`` into those a batch would keep and those it would drop (logged)."""
        kept, dropped = self._encode_all(rollouts)
        return [r for r, _ in kept], dropped

    def build_batch(self, rollouts: Sequence[Rollout]) -> MultimodalBatch:
        missing = [r for r in rollouts if r.advantage is None]
        if missing:
            r = missing[0]
            raise ValueError(
                f"rollout {r.example_id} (#{r.index}) has no advantage: set them first "
                "(MultimodalGRPOTrainer.compute_advantages, or backend.loss.group_advantages)")
        kept, dropped = self._encode_all(rollouts)
        rewards = torch.tensor([r.reward for r, _ in kept], dtype=torch.float32)  # (B,)
        advantages = torch.tensor([float(r.advantage) for r, _ in kept], dtype=torch.float32)  # type: ignore[arg-type]
        B = len(kept)
        L = max((e.length if e.spans is not None else e.length + len(r.completion_ids) for r, e in kept), default=0)
        input_ids = torch.full((B, L), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        loss_mask = torch.zeros((B, L), dtype=torch.float32)
        behavior = torch.zeros((B, L), dtype=torch.float32)
        prompt_lengths = torch.zeros(B, dtype=torch.long)
        token_extra: dict[str, torch.Tensor] = {}
        image_parts: dict[str, list[torch.Tensor]] = {}
        image_index: list[int] = []
        first_image: dict[int, int] = {}  # id(encoding) -> index of its first distinct image
        n_distinct = 0
        for b, (r, e) in enumerate(kept):
            if id(e) not in first_image:
                first_image[id(e)] = n_distinct
                n_distinct += e.num_images
            image_index.extend(range(first_image[id(e)], first_image[id(e)] + e.num_images))
            for k, v in e.image_kwargs.items():
                image_parts.setdefault(k, []).append(v)
            if e.spans is not None:  # an episode: the model turns are already in its ids
                n = e.length
                input_ids[b, :n] = e.input_ids
                attention_mask[b, :n] = 1
                lps = iter(r.behavior_logprobs)
                for s0, s1 in e.spans:
                    loss_mask[b, s0:s1] = 1.0
                    behavior[b, s0:s1] = torch.tensor([next(lps) for _ in range(s1 - s0)], dtype=torch.float32)
                prompt_lengths[b] = e.spans[0][0]
                for k, v in e.token_kwargs.items():
                    if k not in token_extra:
                        token_extra[k] = torch.zeros((B, L), dtype=v.dtype)
                    token_extra[k][b, :n] = v
                continue
            P, C = e.input_ids.numel(), len(r.completion_ids)
            input_ids[b, :P] = e.input_ids
            input_ids[b, P : P + C] = torch.tensor(r.completion_ids, dtype=torch.long)
            attention_mask[b, : P + C] = 1
            loss_mask[b, P : P + C] = 1.0
            behavior[b, P : P + C] = torch.tensor(r.behavior_logprobs, dtype=torch.float32)
            prompt_lengths[b] = P
            for k, v in e.token_kwargs.items():
                if k not in token_extra:
                    token_extra[k] = torch.zeros((B, L), dtype=v.dtype)  # completion/pad: text (0)
                token_extra[k][b, :P] = v
        image_extra = {k: torch.cat(v, dim=0) for k, v in image_parts.items()}
        pixel_values = image_extra.pop("pixel_values", None)
        return MultimodalBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            loss_mask=loss_mask,
            behavior_logprobs=behavior,
            rewards=rewards,
            advantages=advantages,
            pixel_values=pixel_values,
            extra_model_kwargs={**image_extra, **token_extra},
            prompt_lengths=prompt_lengths,
            image_index=torch.tensor(image_index, dtype=torch.long) if image_index else None,
            example_ids=[r.example_id for r, _ in kept],
            indices=[r.index for r, _ in kept],
            dropped=dropped,
        )


def iter_chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    """Consecutive slices of at most ``size`` items."""
    for i in range(0, len(items), size):
        yield items[i : i + size]
