"""Image features cached per image while the vision tower is frozen (Qwen2-VL and Qwen2.5-VL).

With ``train_vision=False`` (the recipes' setting) the tower's output for an image never changes, yet
every PPO epoch, the bootstrap values and the ``_weights_finite`` check ran the tower again on images
the rollout had already encoded, and a task with few distinct observations (NumberLine) encodes the
same images thousands of times. On the tiny preset the tower is about half of a forward pass.

``VisionCache`` stands in for the base model's ``get_image_features`` (an instance attribute, so the
weights, ``save_pretrained`` and the state dict are untouched). Each image is the run of pixel rows
that its ``image_grid_thw`` row names. Its key is the digest of the raw image that ``VLMPolicy.encode``
already took for the input cache (handed over by ``images(keys)`` around the model call), with the
grid; a call from elsewhere hashes the pixel rows instead (0.36 ms a 84 px image). Missing
images are encoded together in one call of the original function, then split per image as the
original splits them. The tower computes each image on its own (per-image attention windows, row-wise
layers), so an image's features are the same bits in any batch of two or more images
(``tests/policy/test_vision_cache.py``). Alone, the CPU kernels round differently (1e-5 seen), so a
lone missing image is encoded beside a copy of itself. A run therefore keeps its exact results and
its exact resume; it can differ in the last bits from a run without the cache only where that run
once encoded a single image (the demo's PPO losses, from the 3rd update, by about 1e-7; its printed
table is the same).

It stores nothing whenever the features could differ or be needed with gradients: a vision parameter
that trains (``train_vision=True``, LoRA on the tower), LoRA layers inside the tower (``reference()``
switches adapters off), dropout active in training mode, or extra keyword arguments (attentions, hidden
states). A training tower still encodes each distinct image of a call once, with gradients (a group
rollout's G rows share their image); the original runs as it is with dropout active or extra keywords.
Loading a state dict into the tower empties it.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from vlmrl.policy.input_cache import LRU


class VisionCache:
    """A caching ``get_image_features(pixel_values, image_grid_thw, **kwargs)`` for a Qwen2-VL base model."""

    def __init__(self, original: Callable[..., Any], visual: nn.Module, max_entries: int = 16384,
                 max_bytes: int = 256 << 20):
        self.original, self.visual = original, visual
        self._given: list[Hashable] | None = None  # the images of the model call under way (``images``)
        self.features = LRU(max_entries, max_bytes)
        self._lora = any("lora_" in name for name, _ in visual.named_parameters())
        self._dropout = [m for m in visual.modules() if isinstance(m, nn.Dropout) and m.p > 0]
        visual.register_load_state_dict_post_hook(lambda *_: self.features.clear())

    @contextlib.contextmanager
    def images(self, keys: Sequence[Hashable]) -> Iterator[None]:
        """Within the block, a call on exactly ``len(keys)`` images takes ``keys`` (``image_key`` of each
        raw image, in row order) as their keys instead of hashing their pixel rows."""
        saved, self._given = self._given, list(keys)
        try:
            yield
        finally:
            self._given = saved

    def _plain(self, kwargs: dict[str, Any]) -> bool:
        """No extra outputs asked for and no dropout active: an image's features depend on its pixels only."""
        if set(kwargs) - {"return_dict"} or kwargs.get("return_dict", True) is not True:
            return False
        return not any(m.training for m in self._dropout)

    def usable(self, kwargs: dict[str, Any]) -> bool:
        """Whether cached features are exactly what the tower would compute now, without gradients."""
        if self.features.max_entries < 1 or self._lora or not self._plain(kwargs):
            return False
        return not any(p.requires_grad for p in self.visual.parameters())

    def _encode(self, rows: Sequence[torch.Tensor], image_grid_thw: torch.Tensor, idx: list[int],
                kwargs: dict[str, Any]) -> Any:
        """The original on the images ``idx`` of the call. A lone image goes beside a copy of itself: at
        batch 1 the CPU kernels round differently (1e-5 seen), at any larger batch an image's features
        are the same bits."""
        run = idx * 2 if len(idx) == 1 else idx
        return self.original(torch.cat([rows[i] for i in run]), image_grid_thw[run], **kwargs)

    def __call__(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if image_grid_thw is None:
            return self.original(pixel_values, image_grid_thw, **kwargs)
        patches = image_grid_thw.prod(-1).tolist()
        if sum(patches) != pixel_values.shape[0]:
            return self.original(pixel_values, image_grid_thw, **kwargs)
        rows = torch.split(pixel_values, patches)
        grids = [tuple(g) for g in image_grid_thw.tolist()]
        if not self.usable(kwargs):
            return self._shared(pixel_values, image_grid_thw, rows, grids, kwargs)
        param = next(self.visual.parameters())
        where = (str(param.device), str(param.dtype))
        if self._given is not None and len(self._given) == len(rows):
            keys = [("image", k, g, where) for k, g in zip(self._given, grids)]
        else:
            keys = [_key(r, g, where) for r, g in zip(rows, grids)]
        found: dict[Hashable, torch.Tensor] = {}
        first: dict[Hashable, int] = {}  # a missing key -> its first row (duplicates are encoded once)
        for i, k in enumerate(keys):
            if k in found or k in first:
                continue
            hit = self.features.get(k)
            if hit is None:
                first[k] = i
            else:
                found[k] = hit
        out = None
        if first:
            idx = list(first.values())
            out = self._encode(rows, image_grid_thw, idx, kwargs)
            for i, feats in zip(idx, out.pooler_output):
                feats = feats.detach()
                found[keys[i]] = feats
                self.features.put(keys[i], feats, feats.numel() * feats.element_size())
        result = out if out is not None else _empty_output()
        result.pooler_output = tuple(found[k] for k in keys)
        if out is not None:  # hidden states of the tower for part of the batch would mislead
            result.last_hidden_state = None
        return result


    def _shared(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor, rows: Sequence[torch.Tensor],
                grids: list[tuple[int, ...]], kwargs: dict[str, Any]) -> Any:
        """Nothing cached (e.g. a training tower): each distinct image of the call is encoded once, with
        gradients, and its features stand for every row that shows it. A group rollout's G rows share one
        image, so the tower's forward and backward shrink G-fold. Only through ``VLMPolicy`` (keys given)
        and for a ``_plain`` call (duplicates would draw different dropout masks)."""
        keys = self._given
        if keys is None or len(keys) != len(rows) or not self._plain(kwargs):
            return self.original(pixel_values, image_grid_thw, **kwargs)
        first: dict[Hashable, int] = {}
        for i, key in enumerate(zip(keys, grids)):
            first.setdefault(key, i)
        if len(first) == len(keys):
            return self.original(pixel_values, image_grid_thw, **kwargs)
        out = self._encode(rows, image_grid_thw, list(first.values()), kwargs)
        feats = dict(zip(first, out.pooler_output))
        out.pooler_output = tuple(feats[key] for key in zip(keys, grids))
        out.last_hidden_state = None  # the tower's hidden states cover the distinct images only
        return out


def _empty_output() -> Any:
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling()


def _key(rows: torch.Tensor, grid: tuple[int, ...], where: tuple[str, str]) -> Hashable:
    """A digest of one image's pixel rows (for calls that do not come through ``VLMPolicy``)."""
    data = rows.detach().contiguous().cpu()
    raw = (data.view(torch.int16) if data.dtype == torch.bfloat16 else data).numpy()  # numpy has no bf16
    digest = hashlib.blake2b(memoryview(raw).cast("B"), digest_size=16).digest()
    return "pixels", grid, str(data.dtype), tuple(data.shape), where, digest


def install(hf_model: nn.Module) -> VisionCache | None:
    """Put a ``VisionCache`` in front of a Qwen2-VL-family model's ``get_image_features``; None (and
    nothing changed) for an architecture it does not know."""
    base = getattr(hf_model, "model", None)
    visual = getattr(base, "visual", None)
    if visual is None or not hasattr(visual, "spatial_merge_size") or not callable(getattr(base, "get_image_features", None)):
        return None
    cache = VisionCache(base.get_image_features, visual)
    base.get_image_features = cache
    return cache


__all__ = ["VisionCache", "install"]
