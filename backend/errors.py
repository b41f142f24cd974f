"""Typed errors that the CLI turns into one readable line (never a traceback)."""

from __future__ import annotations

from pathlib import Path


class VlmrlError(Exception):
    """Base class for errors we expect users to see and act on."""

    exit_code: int = 1


class ConfigError(VlmrlError):
    """A problem in a config file: where (file, dotted key) and what."""

    exit_code = 2

    def __init__(self, path: str | Path | None, key: str | None, message: str) -> None:
        self.path = str(path) if path is not None else None
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = [p for p in (self.path, self.key) if p]
        parts.append(self.message)
        return ": ".join(parts)


class ModelError(VlmrlError):
    """A model could not be resolved or loaded."""

    exit_code = 2


class RequestError(VlmrlError):
    """A request to the inference server was malformed (maps to HTTP 4xx)."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        self.message = message
        self.status = status
        self.code = code
        super().__init__(message)


class WeightSyncError(VlmrlError):
    """A weight sync failed (peer gone, timeout, rejected request, load error)."""
