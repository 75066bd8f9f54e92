"""Model resolution: what a user may type where a model or policy is named, turned into a local folder.

- ``"tiny"``: the tiny preset, built offline on first use and cached (``policy.tiny``);
- a local folder (``runs/sft``, ``/abs/path``, ``./x``, ``~/m``): used as it is, and it must hold
  ``config.json``;
- a Hugging Face Hub id (``Qwen/Qwen2-VL-2B-Instruct``, optionally ``@revision``): resolved through
  ``huggingface_hub.snapshot_download``, so the local cache, ``HF_HUB_CACHE``/``HF_HOME`` and
  ``HF_HUB_OFFLINE=1`` behave as they do for every other Hugging Face tool.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from vlmrl.errors import UserError

if TYPE_CHECKING:
    from vlmrl.tasks import Task

TINY = "tiny"
# owner/name as the Hub spells repository ids, with an optional @revision
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*(@[\w./-]+)?$")


def is_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a Hub id rather than a local path (a path that exists wins)."""
    return bool(_HUB_ID.match(name)) and not Path(name).expanduser().exists()


def resolve_model(model: str, task: "str | Task | None" = None) -> Path:
    """A local model folder for ``model``: ``"tiny"`` (the preset for ``task``, a name or a Task), a
    folder, or a Hub id.

    Raises:
        UserError: a folder without ``config.json``, a path that does not exist, or a Hub id that
            cannot be had (offline and not in the cache, or no connection).
    """
    model = str(model)
    if model == TINY:
        from vlmrl.policy.tiny import tiny_preset_path

        return tiny_preset_path(task=task)
    if is_hub_id(model):
        return hub_snapshot(model)
    path = Path(model).expanduser()
    if not path.exists():
        raise UserError(f"model {model!r} not found: give 'tiny', a folder saved with save_pretrained, "
                        "or a Hugging Face Hub id such as Qwen/Qwen2-VL-2B-Instruct")
    if not (path / "config.json").is_file():
        raise UserError(f"model {model!r} is not a model folder (no config.json): pass 'tiny', a folder "
                        "saved with save_pretrained, or a Hub id")
    return path


def hub_snapshot(hub_id: str) -> Path:
    """The cached (or freshly downloaded) snapshot folder of ``owner/name[@revision]``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, _, revision = hub_id.partition("@")
    # Read at call time: huggingface_hub freezes its constants at import, a test or a user may set
    # these later in the process.
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME") or os.path.join(Path.home(), ".cache", "huggingface"), "hub")
    from huggingface_hub import constants

    offline = (os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
               or bool(constants.HF_HUB_OFFLINE))
    try:
        folder = snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=offline)
    except LocalEntryNotFoundError:
        if offline:
            what = f"is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 is set"
        else:
            what = f"is not in the Hugging Face cache {cache} and the Hub cannot be reached"
        raise UserError(f"model {hub_id!r} {what}: download it where there is a connection "
                        f"(`hf download {repo}`) into that cache, or point HF_HUB_CACHE at the cache "
                        "that holds it, or give a local folder") from None
    except HfHubHTTPError as e:
        raise UserError(f"model {hub_id!r} could not be fetched from the Hub: {e.__class__.__name__}: "
                        f"{str(e).splitlines()[0]}. Check the id (and a token for gated models)") from None
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"Hub model {hub_id!r} has no config.json in {path}: it is not a transformers model")
    return path


__all__ = ["TINY", "hub_snapshot", "is_hub_id", "resolve_model"]
