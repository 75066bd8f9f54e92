"""Processor outputs cached per (image, prompt), so each distinct observation is preprocessed once.

The processor's image resize (PIL) and the chat template + tokenization dominated input encoding: a
rollout re-encodes the same observations for the bootstrap value and every PPO epoch re-encodes the
whole buffer. ``InputCache`` keeps the processor's batch-1 output per row, keyed by a hash of the
image's bytes (with its shape and dtype) and the prompt text, in a bounded LRU, and assembles a batch
from the rows: per-token tensors padded like the tokenizer pads (``pad_token_id`` for ids, 0
otherwise), other tensors (pixel values, grid sizes) concatenated along dim 0 as the processors of
Qwen2-VL, LLaVA and Idefics3 batch them. Rows whose image tensors cannot be concatenated (e.g. a
different number of image tiles) fall back to one uncached batched call, so results never change.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Callable, Hashable, Sequence

import numpy as np
import torch
from PIL import Image

Rows = dict[str, torch.Tensor]
# process(images, prompts) -> the processor's output for that batch (left-padded, return_tensors="pt")
Process = Callable[[Sequence[Any], Sequence[str]], Rows]


class LRU:
    """A dict bounded by entry count and total bytes; the least recently used entries leave first."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> Any | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int = 0) -> None:
        if nbytes > self.max_bytes or self.max_entries < 1:
            return  # would evict everything for one entry
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        while len(self._items) > self.max_entries or self.bytes > self.max_bytes:
            _, (_, size) = self._items.popitem(last=False)
            self.bytes -= size

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0


def image_key(image: Any) -> Hashable:
    """A content key for an image (numpy array or PIL image; None for a text-only prompt)."""
    if image is None:
        return None
    if isinstance(image, Image.Image):
        return ("pil", image.mode, image.size, hashlib.sha256(image.tobytes(), usedforsecurity=False).digest())
    arr = np.ascontiguousarray(image)
    return (arr.shape, arr.dtype.str, hashlib.sha256(memoryview(arr).cast("B"), usedforsecurity=False).digest())


def collate(rows: Sequence[Rows], pad_id: int, left: bool = True) -> Rows | None:
    """Batch-1 processor outputs -> one batch, as the processor would have padded it; None if the
    non-token tensors do not concatenate (shapes differ past dim 0) or the rows differ in keys.

    Per-token tensors are those shaped like ``input_ids`` [1, L]: padded to the longest row with
    ``pad_id`` (input_ids) or 0 (attention mask, token types), on the left unless ``left=False``.
    """
    keys = list(rows[0])
    if "input_ids" not in keys or any(list(r) != keys for r in rows):
        return None
    width = max(r["input_ids"].shape[1] for r in rows)
    out: Rows = {}
    for key in keys:
        values = [r[key] for r in rows]
        if all(v.dim() == 2 and v.shape == r["input_ids"].shape for v, r in zip(values, rows)):
            fill = pad_id if key == "input_ids" else 0
            batch = torch.full((len(rows), width), fill, dtype=values[0].dtype)
            for i, v in enumerate(values):
                n = v.shape[1]
                if left:
                    batch[i, width - n :] = v[0]
                else:
                    batch[i, :n] = v[0]
            out[key] = batch
        elif len({(v.dtype, v.shape[1:]) for v in values}) == 1:
            out[key] = torch.cat(values, 0)
        else:
            return None
    return out


class InputCache:
    """``cache(images, prompts, process)`` == ``process(images, prompts)``, with rows reused.

    ``process`` runs at batch 1 for each row not cached yet. Bounded by ``max_entries`` rows and
    ``max_bytes`` of tensors (a 84 px Qwen2-VL row is about 170 kB; a 308 px one about 2.3 MB).
    ``max_entries=0`` turns caching off.
    """

    def __init__(self, pad_id: int, left: bool = True, max_entries: int = 4096, max_bytes: int = 512 << 20):
        self.pad_id, self.left = pad_id, left
        self.rows = LRU(max_entries, max_bytes)

    def clear(self) -> None:
        """Forget every row (e.g. before a cold-cache timing)."""
        self.rows.clear()

    def __call__(self, images: Sequence[Any], prompts: Sequence[str], process: Process,
                 image_keys: Sequence[Hashable] | None = None) -> Rows:
        """``image_keys``: ``image_key`` of each image, when the caller has them already."""
        if self.rows.max_entries < 1 or not len(prompts):
            return process(images, prompts)
        image_keys = image_keys if image_keys is not None else [image_key(im) for im in images]
        keys = list(zip(image_keys, prompts))
        found: dict[Hashable, Rows] = {}
        for key, image, prompt in zip(keys, images, prompts):
            if key in found:
                continue
            row = self.rows.get(key)
            if row is None:
                row = process([image], [prompt])
                if not all(isinstance(v, torch.Tensor) for v in row.values()):
                    return process(images, prompts)  # nothing to concatenate: stay uncached
                self.rows.put(key, row, sum(v.nbytes for v in row.values()))
            found[key] = row
        batch = collate([found[k] for k in keys], self.pad_id, self.left)
        return process(images, prompts) if batch is None else batch


__all__ = ["InputCache", "LRU", "collate", "image_key"]
