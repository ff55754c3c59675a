"""Bridges from vbxfx to outside tools (each in its own module, imported on demand)."""
