"""The ``vbxfx`` command line (``vbxfx.cli:main``).

- :mod:`vbxfx.cli.main`: the parser, logging and threads, :func:`main`;
- :mod:`vbxfx.cli.commands`: one function per command;
- :mod:`vbxfx.cli.console`: what people see (results on stdout, progress on stderr);
- :mod:`vbxfx.cli.report`: the text tables and plots of a compression report.

Building the parser imports neither torch nor onnx, so ``vbxfx --help`` is fast.
"""

from vbxfx.cli.main import build_parser, default_threads, main

__all__ = ["main", "build_parser", "default_threads"]
