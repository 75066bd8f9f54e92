"""vlmrl: fine-tune vision-language models into decision-making agents with RL (RL4VLM, reproducible).

The public seams: ``vlmrl.Task`` (subclass it for a task of your own), ``register_task`` and
``get_task`` (a built-in name, a registered one, or an import path ``module:attr``). Importing
``vlmrl`` stays light (Gymnasium and the tasks, no torch).
"""

from vlmrl import tasks  # noqa: F401  (registers the vlmrl/ Gymnasium ids)
from vlmrl.tasks import Task, get_task, register_task

__version__ = "0.1.0"

__all__ = ["Task", "get_task", "register_task", "__version__"]
