"""Processor classes that work without torchvision, registered with ``AutoProcessor``.

``Qwen2VLProcessor`` and ``Qwen2_5_VLProcessor`` declare a video slot; without torchvision there is
no video processor to put in it, so they fail to build and to save. The subclasses here simply have
no video slot (images and text only). They are registered with ``AutoProcessor`` under config keys of
their own: ``AutoProcessor.from_pretrained`` finds a processor class by the name saved in
``processor_config.json`` and only looks among registered classes for names it does not ship, and
without that it silently falls back to returning the bare tokenizer.

``register_processors()`` is idempotent and runs when ``vlmrl.policy`` is imported.
"""

from __future__ import annotations

from transformers import AutoProcessor, PretrainedConfig
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor


class ImageQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor for images and text only (no video slot, so no torchvision needed)."""

    # The signature, not a class attribute, tells ProcessorMixin which sub-processors exist.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


class ImageQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images and text only (no video slot, so no torchvision needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)


# Placeholder configs: AutoProcessor.register keys its table by config class. These never describe a
# model; they only give the processors an entry that processor_class_from_name can find by name.
class _ImageQwen2VLProcessorKey(PretrainedConfig):
    model_type = "vlmrl_image_qwen2_vl_processor"


class _ImageQwen2_5_VLProcessorKey(PretrainedConfig):
    model_type = "vlmrl_image_qwen2_5_vl_processor"


_REGISTRY = (
    (_ImageQwen2VLProcessorKey, ImageQwen2VLProcessor),
    (_ImageQwen2_5_VLProcessorKey, ImageQwen2_5_VLProcessor),
)

#: architecture (config ``model_type``) -> the processor class to build for it here
PROCESSOR_FOR_ARCH: dict[str, type] = {
    "qwen2_vl": ImageQwen2VLProcessor,
    "qwen2_5_vl": ImageQwen2_5_VLProcessor,
}


def register_processors() -> None:
    """Make ``AutoProcessor.from_pretrained`` find the classes above; safe to call many times."""
    for key, processor in _REGISTRY:
        AutoProcessor.register(key, processor, exist_ok=True)


__all__ = ["ImageQwen2VLProcessor", "ImageQwen2_5_VLProcessor", "PROCESSOR_FOR_ARCH", "register_processors"]
