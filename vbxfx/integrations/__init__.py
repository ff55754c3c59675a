"""Integrations of vbxfx with other tools, one module each (ultralytics, onnx2tf)."""
