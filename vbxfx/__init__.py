"""vbxfx: compress PyTorch models for the Microchip VectorBlox accelerator as torch.fx passes."""

from vbxfx.errors import CheckError, ConfigError, ExportError, FormatError, TraceError, VbxError

__version__ = "0.1.0"

__all__ = [
    "VbxError", "FormatError", "ConfigError", "TraceError", "ExportError", "CheckError",
]
