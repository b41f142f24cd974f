"""Which device the trainer (and ``vlmrl eval``) computes on."""

from __future__ import annotations

import os

from backend.errors import ConfigError


def trainer_device(pref: str, gpus: int) -> str:
    """``cuda`` or ``cpu`` for ``[trainer.args] device`` and ``[trainer] gpus``.

    Asking for GPUs (``gpus > 0`` or ``device = "cuda"``) where CUDA cannot be used is an
    error, never a silent fall-back to CPU training: a wrong ``CUDA_VISIBLE_DEVICES`` or a
    driver older than torch's CUDA build would otherwise train for hours on the CPU.
    """
    import torch

    if pref == "cpu":
        return "cpu"
    if gpus > 0 or pref == "cuda":
        if not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            why = (f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "CUDA_VISIBLE_DEVICES unset")
            build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda else \
                f"torch {torch.__version__} is a CPU build"
            asked = f"[trainer] gpus = {gpus}" if gpus > 0 else '[trainer.args] device = "cuda"'
            raise ConfigError(None, "trainer.gpus" if gpus > 0 else "trainer.args.device",
                              f"{asked} but CUDA is not usable here ({why}; {build}); run `vlmrl doctor` "
                              "to compare the driver with torch's CUDA build, or set gpus = 0 to train on CPU")
        return "cuda"
    return "cuda" if torch.cuda.is_available() else "cpu"
