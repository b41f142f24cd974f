"""How much GPU memory the trainer needs: parameters counted exactly, the rest by formula.

:func:`model_shape` instantiates a Hugging Face config on the meta device (no memory, no
weights) and counts its parameters exactly (tied weights once). :func:`estimate_trainer_memory`
turns that count and the ``[trainer.args]`` precision into a per-GPU breakdown:

=====================  =========  ==========================  ===================================
mode                   weights    master / grads / AdamW m,v  optimizer-step temporaries
=====================  =========  ==========================  ===================================
float32                4 B        - / 4 / 4+4                 none (fused AdamW on CUDA)
bf16 fp32-master       2 B (*)    4 / 4 / 4+4                 none (fused AdamW on CUDA)
bf16 stoch. rounding   2 B        - / 2 / 2+2                 5 fp32 chunks of ``optim.SR_CHUNK``
=====================  =========  ==========================  ===================================

(*) autocast's bf16 copies of every matmul weight, alive from the forward to the backward.
The optimizers are backend/optim.py's; torch's default ``foreach`` AdamW would add a
temporary of 4 bytes per parameter.

Activations are those autograd saves for a micro-batch of ``micro_batch_size`` sequences of
``seq_len`` tokens, per decoder layer and per vision block, as read off the Qwen3-VL modules
and checked against the tensors autograd really saves (tests/test_memory.py): RMSNorm saves
its fp32 input and normalised output, attention saves q, k, v (repeated to every head when a
padding mask forces the masked kernel), its output, and a float copy of the (L, L) mask per
layer, the SwiGLU MLP saves four (L, intermediate) tensors. Gradient checkpointing keeps only
each layer's input and recomputes one layer at a time in the backward. Logits exist only for
``logit_positions`` positions (backend/logprobs.py passes ``logits_to_keep``), but in fp32
over the whole vocabulary, several copies at once. The optimizer step runs after the
backward has freed the activations, so the peak is the larger of the two phases.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from backend.errors import ModelError

if TYPE_CHECKING:
    from backend.config import VlmrlConfig

GiB = 1024**3
#: CUDA context (~0.5 GiB), cuBLAS and NCCL workspaces, and some caching-allocator slack.
CUDA_OVERHEAD_BYTES = 2 * GiB
#: What NVML reports as the total of an 80 GB H100 (81559 MiB).
H100_80GB_BYTES = 81559 * 1024**2

Mode = Literal["float32", "fp32-master", "stochastic-rounding"]


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model: exact parameter counts and the layer sizes."""

    params: int  # every parameter, tied weights once
    param_tensors: int  # AdamW keeps one step counter per tensor
    largest_param: int  # elements of the largest tensor (per-parameter optimizer temporaries)
    matmul_params: int  # weights autocast casts (Linear/Conv): the input embedding is not one
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_hidden: int = 0
    vision_intermediate: int = 0
    vision_layers: int = 0
    vision_merge: int = 1  # image token = merge**2 patches (Qwen's spatial merge; 1 for LLaVA)
    patch_values: int = 0  # pixel values per patch (C * T * P * P)
    vision_mergers: int = 0  # patch mergers (Qwen3-VL: 1 + one per deepstack layer)


def qwen3_vl_8b_config() -> Any:
    """The config of Qwen/Qwen3-VL-8B-Instruct (8,767,123,696 parameters), offline."""
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
            num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False,
            max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 5_000_000, "mrope_section": [24, 20, 20],
                             "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096, patch_size=16,
            spatial_merge_size=2, temporal_patch_size=2, in_channels=3, deepstack_visual_indexes=[8, 16, 24],
            num_position_embeddings=2304, hidden_act="gelu_pytorch_tanh",
        ),
        tie_word_embeddings=False,
    )


#: hub ids whose config vlmrl keeps, so their memory is known before the download
KNOWN_CONFIGS = {"Qwen/Qwen3-VL-8B-Instruct": qwen3_vl_8b_config}


def hf_config(model: str) -> Any:
    """The Hugging Face config of ``model`` without downloading or building anything.

    ``builtin:*`` must be built already, a hub id must be in the Hugging Face cache (or in
    :data:`KNOWN_CONFIGS`); otherwise :class:`ModelError` says why (the doctor then skips its
    memory check).
    """
    from backend import models

    m = model.strip()
    if m.startswith(models.BUILTIN_PREFIX):
        from backend.tiny import read_provenance

        name = m[len(models.BUILTIN_PREFIX):]
        if name not in models.BUILTINS:
            raise ModelError(f"unknown builtin model {m!r}")
        path = models.builtin_dir(name)
        if read_provenance(path) is None:
            raise ModelError(f"{m} is not built yet (it is built on the first start)")
        source = str(path)
    elif Path(m).expanduser().is_dir():
        source = str(Path(m).expanduser())
    elif models._in_hf_cache(m):
        source = m
    elif m in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[m]()  # estimate before the download
    else:
        raise ModelError(f"{m} is not in the Hugging Face cache (huggingface-cli download {m})")
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(source, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; one line is enough
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot read the config of {m}: {first}") from None


def model_shape(config: Any) -> ModelShape:
    """Count the parameters of ``config`` exactly (model built on the meta device) and read its sizes."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        net = AutoModelForImageTextToText.from_config(config)
    params = list(net.parameters())  # shared (tied) tensors appear once
    matmul = sum(p.numel() for mod in net.modules()
                 if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d))
                 for p in mod.parameters(recurse=False))
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    vision = getattr(config, "vision_config", None)
    v: dict[str, int] = {}
    if vision is not None:
        v_hidden = int(getattr(vision, "embed_dim", 0) or vision.hidden_size)  # Qwen2-VL: embed_dim
        v_inter = int(getattr(vision, "intermediate_size", 0) or v_hidden * getattr(vision, "mlp_ratio", 4))
        merge = int(getattr(vision, "spatial_merge_size", 1))
        deep = len(getattr(vision, "deepstack_visual_indexes", None) or [])
        v = dict(
            vision_hidden=v_hidden, vision_intermediate=v_inter,
            vision_layers=int(getattr(vision, "depth", 0) or vision.num_hidden_layers), vision_merge=merge,
            patch_values=int(getattr(vision, "in_channels", getattr(vision, "num_channels", 3)))
            * int(getattr(vision, "temporal_patch_size", 1)) * int(vision.patch_size) ** 2,
            vision_mergers=(1 + deep) if merge > 1 else 0,
        )
    return ModelShape(
        params=sum(p.numel() for p in params),
        param_tensors=len(params),
        largest_param=max(p.numel() for p in params),
        matmul_params=matmul,
        hidden=int(text.hidden_size),
        intermediate=int(text.intermediate_size),
        layers=int(text.num_hidden_layers),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(text, "head_dim", None) or text.hidden_size // heads),
        vocab=int(text.vocab_size),
        **v,
    )


def precision_mode(dtype: str, low_precision_update: str = "fp32-master") -> Mode:
    """The memory mode of ``[trainer.args] dtype`` and ``low_precision_update``."""
    if dtype == "float32":
        return "float32"
    return "stochastic-rounding" if low_precision_update == "stochastic-rounding" else "fp32-master"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per trainer GPU, by what holds them; :attr:`total` is the peak."""

    weights: int  # the compute-dtype weights (fp32-master: autocast's transient bf16 copies)
    master_weights: int  # fp32 master parameters (fp32-master only)
    grads: int
    optimizer_state: int  # AdamW's two moments (and step counters)
    optimizer_step: int  # temporaries of the step; activations are freed by then
    reference_model: int  # frozen reference for beta > 0
    activations: int  # peak of one micro-batch's forward + backward
    overhead: int  # CUDA context, workspaces, allocator slack
    mode: Mode
    micro_batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    image_tokens: int = 0  # per sequence, of seq_len

    @property
    def weights_transient(self) -> bool:
        """fp32-master's bf16 weights exist only from the forward to the backward."""
        return self.mode == "fp32-master"

    @property
    def static(self) -> int:
        """What lives through a whole step: parameters, gradients and optimizer state."""
        weights = 0 if self.weights_transient else self.weights
        return weights + self.master_weights + self.grads + self.optimizer_state

    @property
    def total(self) -> int:
        """Peak bytes: the static part plus the larger of the training phase and the optimizer step."""
        training = self.activations + (self.weights if self.weights_transient else 0)
        return self.static + self.reference_model + self.overhead + max(training, self.optimizer_step)

    def parts(self) -> list[tuple[str, int]]:
        """The non-zero parts as ``(label, bytes)``."""
        labels = {
            "weights": "bf16 autocast weights" if self.weights_transient else "weights",
            "master_weights": "fp32 master weights", "grads": "grads", "optimizer_state": "AdamW state",
            "optimizer_step": "step temporaries", "reference_model": "reference model",
            "activations": "activations", "overhead": "CUDA/allocator",
        }
        return [(labels[f.name], getattr(self, f.name)) for f in fields(self)
                if f.name in labels and getattr(self, f.name)]

    def describe(self) -> str:
        """One line: the peak, then each part in GiB."""
        ckpt = "checkpointed" if self.gradient_checkpointing else "no checkpointing"
        images = f" (up to {self.image_tokens} image tokens)" if self.image_tokens else ""
        parts = ", ".join(f"{name} {n / GiB:.1f}" for name, n in self.parts())
        return (f"~{self.total / GiB:.1f} GiB peak ({self.mode}; micro-batch {self.micro_batch_size} x "
                f"{self.seq_len} tokens{images}, {ckpt}): {parts}")


def _text_layer_bytes(s: ModelShape, mode: Mode, seq_len: int, padded: bool) -> int:
    """Bytes autograd saves per token in one decoder layer (RMSNorm, GQA attention, SwiGLU MLP)."""
    h, q, kv, inter = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    e = 4 if mode == "float32" else 2  # compute dtype
    if mode == "float32":
        norms = 2 * (4 * h + 4 * h + 4 * h)  # fp32 input, normalised, output (one tensor for q/k/v)
    elif mode == "stochastic-rounding":
        norms = 2 * (4 * h + 2 * h + 2 * h)  # fp32 upcast, bf16 normalised, bf16 output
    else:  # fp32 residual stream; autocast casts the norm output once per consuming matmul
        norms = 2 * (4 * h + 4 * h) + (3 + 2) * 2 * h
    # q and k: fp32 upcast in q_norm/k_norm and the normalised copy; attention keeps rotated q, k, v
    # and its output. A padding mask makes transformers repeat k and v to every head first.
    kv_seen = q if padded else kv
    attn = (4 + e) * (q + kv) + e * (q + 2 * kv_seen + q) + 4 * s.heads  # + logsumexp
    if padded:
        attn += e * seq_len  # the (L, L) mask, converted to a float bias for every layer
    mlp = 4 * e * inter  # gate, act(gate), up, act(gate) * up
    stats = 4 * (2 + s.heads + s.kv_heads)  # RMSNorm rsqrt
    return norms + attn + mlp + stats


def _vision_block_bytes(s: ModelShape, mode: Mode) -> int:
    """Bytes saved per patch in one vision block (LayerNorm, fused qkv, GELU MLP)."""
    e = 4 if mode == "float32" else 2
    # norm1 in/out, qkv (kept whole by v), rotated q and k, attention out, proj input, norm2 in/out,
    # fc1 out, GELU out
    return e * (11 * s.vision_hidden + 2 * s.vision_intermediate)


def _patches(s: ModelShape, micro_batch_size: int, seq_len: int, image_tokens: int) -> int:
    return micro_batch_size * min(image_tokens, seq_len) * s.vision_merge**2 if s.vision_layers else 0


def saved_activation_bytes(
    shape: ModelShape, mode: Mode, *, micro_batch_size: int, seq_len: int, image_tokens: int = 0,
    gradient_checkpointing: bool = False,
) -> int:
    """Bytes autograd holds for the backward at the end of one micro-batch's forward.

    Micro-batches of more than one sequence are right-padded, so they carry an attention mask.
    """
    s, B, L = shape, micro_batch_size, seq_len
    padded = B > 1
    e_res = 2 if mode == "stochastic-rounding" else 4  # residual stream (fp32 under autocast)
    per_layer = e_res * s.hidden if gradient_checkpointing else _text_layer_bytes(s, mode, L, padded)
    cos_sin = 2 * s.head_dim * (2 if mode == "stochastic-rounding" else 4)
    final_norm = 12 * s.hidden if mode == "float32" else 8 * s.hidden
    ids = 8  # the embedding keeps the int64 token ids
    text = B * L * (s.layers * per_layer + final_norm + cos_sin + ids) + (B * L * L if padded else 0)  # bool mask
    e_v = 4 if mode == "float32" else 2
    per_block = e_v * s.vision_hidden if gradient_checkpointing else _vision_block_bytes(s, mode)
    # the batch's fp32 pixels (and their cast to the compute dtype), and the patch mergers,
    # which are never checkpointed
    pixels = 4 * s.patch_values + (e_v * s.patch_values if e_v != 4 else 0)
    fixed = pixels + e_v * 4 * s.vision_hidden * s.vision_mergers
    return text + _patches(s, B, L, image_tokens) * (s.vision_layers * per_block + fixed)


def estimate_trainer_memory(
    shape: ModelShape,
    *,
    dtype: str = "float32",
    low_precision_update: str = "fp32-master",
    micro_batch_size: int = 1,
    seq_len: int = 4096,
    logit_positions: int | None = None,
    image_tokens: int = 0,
    gradient_checkpointing: bool = False,
    beta: float = 0.0,
    trainable_fraction: float = 1.0,
    overhead: int = CUDA_OVERHEAD_BYTES,
) -> MemoryEstimate:
    """Peak GPU memory of one trainer step, per GPU, with its breakdown.

    ``seq_len`` tokens per sequence (``image_tokens`` of them image tokens, each
    ``vision_merge**2`` patches through the vision tower), logits for ``logit_positions``
    positions per sequence (default: all), ``trainable_fraction`` of the parameters trained
    (LoRA later: gradients and optimizer state shrink, weights do not).
    """
    s = shape
    mode = precision_mode(dtype, low_precision_update)
    B, L = micro_batch_size, seq_len
    T = L if logit_positions is None else min(logit_positions, L)
    trainable = round(s.params * trainable_fraction)
    e_c = 4 if mode == "float32" else 2  # compute dtype
    e_p = 2 if mode == "stochastic-rounding" else 4  # parameter, gradient and moment dtype
    steps = 4 * s.param_tensors if trainable else 0  # AdamW step counters

    if mode == "fp32-master":
        weights, master = 2 * s.matmul_params, 4 * s.params
    else:
        weights, master = e_p * s.params, 0
    grads = e_p * trainable
    state = 2 * e_p * trainable + steps
    if mode == "stochastic-rounding":
        from backend.optim import SR_CHUNK  # the chunk StochasticRoundingAdamW updates at a time

        # gradient, moments and weight upcast to fp32, sqrt(v), the rounding noise: ~5 fp32 chunks
        step_tmp = 5 * 4 * min(s.largest_param, SR_CHUNK, trainable)
    else:
        step_tmp = 0  # fused AdamW updates in place
    ref = e_c * s.params if beta > 0 else 0

    saved = saved_activation_bytes(s, mode, micro_batch_size=B, seq_len=L, image_tokens=image_tokens,
                                   gradient_checkpointing=gradient_checkpointing)
    logits = B * T * s.vocab
    # the largest weight's gradient, before it is added to .grad (bf16, then fp32, under autocast)
    grad_tmp = s.largest_param * (e_c + (4 if mode == "fp32-master" else 0))
    recompute = 1 if gradient_checkpointing else 0
    patches = _patches(s, B, L, image_tokens)
    transient = max(
        logits * (e_c + 12),  # end of forward: logits, fp32 log-softmax, exp and product for the entropy
        logits * 12 + grad_tmp,  # start of backward: log-softmax gradients, then lm_head's weight gradient
        # a decoder layer's / vision block's backward: its recomputed activations when checkpointed,
        # and gradients of the size of a few fp32 hidden states
        B * L * (recompute * _text_layer_bytes(s, mode, L, B > 1) + 16 * s.hidden),
        patches * (recompute * _vision_block_bytes(s, mode) + 16 * s.vision_hidden),
    )
    return MemoryEstimate(
        weights=weights, master_weights=master, grads=grads, optimizer_state=state, optimizer_step=step_tmp,
        reference_model=ref, activations=saved + transient, overhead=overhead, mode=mode,
        micro_batch_size=B, seq_len=L, gradient_checkpointing=gradient_checkpointing,
        image_tokens=min(image_tokens, L) if s.vision_layers else 0,
    )


def estimate_for_config(shape: ModelShape, cfg: VlmrlConfig, *, trainable_fraction: float = 1.0,
                        overhead: int = CUDA_OVERHEAD_BYTES) -> MemoryEstimate:
    """:func:`estimate_trainer_memory` for a :class:`~backend.config.VlmrlConfig`: the worst case it allows.

    Sequences are ``inference.args.max_model_len`` long; logits cover the completion
    (``max_tokens`` + 1 positions, as for a micro-batch of one prompt's rollouts); every
    prompt position may be an image token when the config allows images.
    """
    a = cfg.trainer.args
    L = cfg.inference.args.max_model_len
    images = cfg.inference.args.limit_mm_per_prompt.get("image", 0) > 0
    return estimate_trainer_memory(
        shape, dtype=a.dtype, low_precision_update=a.low_precision_update, micro_batch_size=a.micro_batch_size,
        seq_len=L, logit_positions=a.max_tokens + 1, image_tokens=max(L - a.max_tokens, 0) if images else 0,
        gradient_checkpointing=a.gradient_checkpointing, beta=a.beta, trainable_fraction=trainable_fraction,
        overhead=overhead,
    )
