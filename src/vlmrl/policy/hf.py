"""Glue around the Hugging Face libraries that every loader and saver of vlmrl shares."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_library_bars() -> Iterator[None]:
    """transformers' and huggingface_hub's own progress bars off ("Loading weights", "Writing model
    shards"), restored afterwards: inside vlmrl's commands only vlmrl's bars and lines print, and a
    checkpoint per update does not add a bar per update to the log."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


__all__ = ["quiet_library_bars"]
