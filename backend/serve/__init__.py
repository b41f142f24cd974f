"""``vlmrl serve``: the inference server of a config (the ``hf`` engine).

:func:`serve_main` loads the model, warms the engine up (``/health`` answers 200 only
after a real generation), serves HTTP on ``inference.host:port`` (127.0.0.1 unless
configured) and exits cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from backend import contract, net
from backend.errors import VlmrlError
from backend.logs import setup_logging

if TYPE_CHECKING:
    import uvicorn

    from backend.config import VlmrlConfig

log = logging.getLogger("vlmrl.serve")

__all__ = ["serve_main"]


def _server_keeping_our_signal_handlers(config: "uvicorn.Config") -> "uvicorn.Server":
    """A uvicorn server that leaves SIGTERM/SIGINT to :func:`serve_main`'s handlers.

    Private uvicorn API: overrides ``Server.capture_signals``, the context manager ``serve``
    installs its own handlers with; uvicorn has no option to skip them. They re-raise a
    caught SIGTERM after shutdown (exit status -15), and we want a clean exit 0 after
    stopping the engine. Checked on uvicorn 0.54.0.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return _Server(config)


def _check_port(host: str, port: int) -> None:
    error = net.bind_error(host, port)
    if error is not None:
        raise VlmrlError(f"cannot serve on {host}:{port}: {error.strerror or error} (inference.port)")


def _device_and_dtype(cfg: "VlmrlConfig") -> tuple[str, str]:
    import torch

    use_gpu = cfg.inference.gpus > 0
    if use_gpu and not torch.cuda.is_available():
        raise VlmrlError(f"inference.gpus = {cfg.inference.gpus} but no CUDA device is visible")
    device = "cuda" if use_gpu else "cpu"
    dtype = cfg.inference.args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return device, dtype


def serve_main(cfg: "VlmrlConfig") -> int:
    """Run the inference server of ``cfg`` until SIGTERM/SIGINT; return the exit code."""
    setup_logging(sys.stderr, timestamps=True)
    if cfg.inference.engine != "hf":
        raise VlmrlError(f"`vlmrl serve` runs the 'hf' engine; engine {cfg.inference.engine!r} is started "
                         "through vLLM's own server (the supervisor does that)")
    host, port = cfg.inference.host, cfg.inference.port
    _check_port(host, port)

    import torch
    import uvicorn

    from backend.models import load_model_and_processor
    from backend.serve.app import create_app
    from backend.serve.hf_engine import HFEngine
    from backend.serve.protocol import MediaLimits

    threads = cfg.trainer.args.torch_threads
    if threads is None and cfg.inference.gpus == 0:
        threads = max(1, (os.cpu_count() or 2) // 2)  # the trainer shares these cores
    if threads:
        torch.set_num_threads(threads)
    token = os.environ.get(contract.ENV_RUN_TOKEN) or None
    if token is None:
        log.warning("%s is not set: weight-sync and admin routes will answer 401", contract.ENV_RUN_TOKEN)
    if not net.is_loopback(host):
        log.warning("serving on %s: reachable beyond this machine (admin routes still need the token)", host)
    device, dtype = _device_and_dtype(cfg)
    args = cfg.inference.args
    t0 = time.monotonic()
    model, processor = load_model_and_processor(cfg.model, dtype=dtype, device=device)
    engine = HFEngine(
        model, processor, model_name=cfg.model, max_model_len=args.max_model_len,
        max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
        weight_backend="nccl" if device == "cuda" else "gloo",
    )
    engine.start()
    try:
        engine.warmup()
    except Exception as e:
        engine.stop()
        raise VlmrlError(f"model {cfg.model!r} loaded but cannot generate: {type(e).__name__}: {e}") from e
    log.info("model %s loaded on %s (%s, %d torch threads) and warmed up in %.1fs",
             cfg.model, device, dtype, torch.get_num_threads(), time.monotonic() - t0)
    limits = MediaLimits(
        max_images=int(args.limit_mm_per_prompt.get("image", 0)),
        max_image_pixels=args.max_image_pixels,
        allowed_local_media_path=Path(args.allowed_local_media_path) if args.allowed_local_media_path else None,
    )
    app = create_app(engine, token=token, limits=limits)
    server = _server_keeping_our_signal_handlers(uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5,
        lifespan="off",
    ))

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            log.info("ready: serving %s at http://%s:%d (engine hf)", cfg.model, host, port)

    def on_signal(signum: int, _frame: object) -> None:
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True
        log.info("received %s, shutting down", signal.Signals(signum).name)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    threading.Thread(target=announce, name="announce", daemon=True).start()
    try:
        server.run()
    finally:
        engine.stop()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    log.info("server stopped")
    return 0 if server.started else 1
