"""Files that a kill cannot leave half-written: one helper for every small file vlmrl writes whole."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that a reader (or a crash) sees the old file or the new one, never
    half of one: a temporary file beside it, fsynced, then ``os.replace`` and an fsync of the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def filter_jsonl(path: str | os.PathLike, keep: Callable[[dict[str, Any]], bool]) -> int:
    """Keep the complete JSON-object lines of ``path`` for which ``keep(row)`` is true (atomically);
    a torn line from a crash goes too. Returns how many stay (0 when the file does not exist)."""
    path = Path(path)
    if not path.exists():
        return 0
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and keep(row):
                kept.append(json.dumps(row) + "\n")
    write_atomic(path, "".join(kept))
    return len(kept)


__all__ = ["filter_jsonl", "write_atomic"]
