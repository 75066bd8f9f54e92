"""The policy side: any Hugging Face VLM (or the tiny one built offline) with a value head.

Importing this package registers the torchvision-free processor classes with ``AutoProcessor``
(see ``processors.py``), so ``AutoProcessor.from_pretrained`` loads every model saved by vlmrl.
"""

from vlmrl.policy.processors import register_processors

register_processors()
