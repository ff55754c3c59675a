"""What the command line says to people: results on stdout, progress and logs on stderr.

Each stage shows while it runs. On a terminal it is a live line (``  trace ... 1.2 s``), or a
bar for stages with steps (``  refit: layers  12/21 |████▌  | 34.0 s``), redrawn twice a
second so a long step visibly runs; log records go through ``tqdm.write``, so they never
break a progress line. Elsewhere (a CI log, a pipe) every stage prints one plain line when it
ends, and a stage with steps also one when it starts.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import threading
import time
from typing import IO, Any, Iterator

__all__ = ["Console", "TqdmHandler"]

_SINGLE = "{desc} ... {elapsed_s:.1f} s"
_STEPS = "{desc}  {n_fmt}/{total_fmt} |{bar}| {elapsed_s:.1f} s"


class TqdmHandler(logging.StreamHandler):
    """A logging handler that writes through ``tqdm.write`` (above any live progress line)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


class Console:
    """Results (``out``) on stdout, notes and progress on stderr; ``quiet`` keeps only
    results and errors, ``json_mode`` keeps stdout for the JSON document alone."""

    def __init__(self, quiet: bool = False, json_mode: bool = False,
                 stdout: IO[str] | None = None, live: bool | None = None) -> None:
        self.quiet, self.json_mode = quiet, json_mode
        self.stdout = stdout or sys.stdout
        self.show = not quiet and not json_mode
        self.live = sys.stderr.isatty() if live is None else live
        self._bar: Any = None
        self._name: str | None = None
        self._t0 = 0.0
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    # ------------------------------------------------------------------ text
    def out(self, text: str = "") -> None:
        if not self.json_mode:
            print(text, file=self.stdout, flush=True)

    def note(self, text: str) -> None:
        if self.show:
            self._write(text)

    def _write(self, text: str) -> None:
        if self._bar is not None:
            from tqdm import tqdm
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    # -------------------------------------------------------------- progress
    def progress(self, stage: str, done: int, total: int) -> None:
        """The ``progress=`` callback of :func:`vbxfx.compress`: ``(stage, 0, total)`` starts
        a stage, ``(stage, total, total)`` ends it, values in between advance it."""
        if not self.show:
            return
        if stage != self._name:
            self.end()
            self._begin(stage, total)
        if self._bar is not None:
            self._bar.n = min(done, total)
            self._bar.refresh()
        if done >= total:
            self.end()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """A stage of the command line's own (load, export, check, save)."""
        self.progress(name, 0, 1)
        try:
            yield
        except BaseException:
            self.end(failed=True)
            raise
        self.progress(name, 1, 1)

    def _begin(self, stage: str, total: int) -> None:
        self._name, self._t0 = stage, time.perf_counter()
        label = f"  {stage}"
        if self.live:
            from tqdm import tqdm
            size = shutil.get_terminal_size((80, 24))        # 0 x 0 in some ptys
            self._bar = tqdm(total=max(total, 1), desc=label, file=sys.stderr, leave=True,
                             bar_format=_STEPS if total > 1 else _SINGLE,
                             ncols=min(size.columns or 80, 100), nrows=size.lines or 24)
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, args=(self._bar,), daemon=True)
            self._ticker.start()
        elif total > 1:
            print(f"{label} 0/{total} ...", file=sys.stderr, flush=True)

    def _tick(self, bar: Any) -> None:
        while not self._stop.wait(0.5):
            bar.refresh()

    def end(self, failed: bool = False) -> None:
        """Close the running stage's line (``failed``: it raised)."""
        if self._name is None:
            return
        seconds = time.perf_counter() - self._t0
        if self._bar is not None:
            self._stop.set()
            if self._ticker is not None:
                self._ticker.join()
            if failed:
                self._bar.bar_format = "{desc} ... failed"
            self._bar.close()
            self._bar = self._ticker = None
        else:
            print(f"  {self._name}: {'failed after' if failed else 'done in'} {seconds:.1f} s",
                  file=sys.stderr, flush=True)
        self._name = None
