"""vlmrl: fine-tune vision-language models into decision-making agents with RL (RL4VLM, reproducible)."""

from vlmrl import tasks  # noqa: F401  (registers the vlmrl/ Gymnasium ids)

__version__ = "0.1.0"
