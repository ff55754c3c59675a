"""The vbxfx exception hierarchy.

Every error a user can provoke with bad input derives from :class:`VbxError`, so
``except vbxfx.VbxError`` catches them all; the ones about bad values also derive
from :class:`ValueError`, so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

__all__ = ["VbxError", "FormatError", "TraceError", "ConfigError", "ExportError", "CheckError",
           "one_line"]


class VbxError(Exception):
    """Base class of every error raised on purpose by vbxfx."""


class FormatError(VbxError, ValueError):
    """A weight, repeat or encoding that the VectorBlox format does not accept."""


class ConfigError(VbxError, ValueError):
    """An option, target or per-layer override that cannot be honoured."""


class TraceError(VbxError, RuntimeError):
    """The model could not be turned into a torch.fx graph."""


class ExportError(VbxError, RuntimeError):
    """The model could not be exported to ONNX."""


class CheckError(VbxError, ValueError):
    """An ONNX file that cannot be checked (missing, not ONNX, no annotations, ...)."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of ``str(e)`` (the exception's type name if none), cut to
    ``limit`` characters: how a caught error is quoted inside a vbxfx message."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
