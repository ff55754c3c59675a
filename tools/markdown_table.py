"""The closing table the int8 benchmarks print: a title, a Markdown header, one line per row,
and the rows as JSON when asked."""

from __future__ import annotations

import json
from collections.abc import Callable


def print_rows(title: str, header: str, rows: list[dict], line: Callable[[dict], str],
               json_path: str | None = None) -> None:
    """Print ``title``, the Markdown ``header`` (``| a | b |``) with its rule, and
    ``line(row)`` for each row; also write ``rows`` to ``json_path`` if given."""
    print(title)
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(line(r))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
