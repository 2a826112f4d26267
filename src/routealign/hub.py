"""Model folders and Hugging Face hub ids alike, as transformers resolves them: ``org/name`` (optionally
``org/name@revision``) is looked up in the local hub cache first and downloaded only when it is not there and the
hub may be reached (``HF_HUB_OFFLINE`` unset). Errors name the id and the reason: not on the hub (or private), gated,
not cached while offline, the hub unreachable.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InputError

__all__ = ["resolve_model", "is_hub_id", "hub_cache"]

# what a model or checkpoint needs: config, weights, tokenizer files, chat templates
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.yaml"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")


def is_hub_id(spec: str | Path) -> bool:
    """Whether ``spec`` has the form of a hub id (``org/name`` or ``org/name@revision``) rather than a path."""
    text = str(spec)
    return bool(_HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def hub_cache() -> Path:
    """The hub cache folder, read from the environment at each call (``HF_HUB_CACHE``, ``HF_HOME``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return flag.upper() in ("1", "ON", "YES", "TRUE") or bool(constants.HF_HUB_OFFLINE)


def resolve_model(spec: str | Path, what: str = "model") -> Path:
    """The local folder of ``spec``: the folder itself, or a hub id's snapshot in the hub cache (downloaded first
    when it is not cached and the hub may be reached). ``what`` names the argument in errors."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{what} {spec} is a file, not a model folder")
    if not is_hub_id(spec):
        raise InputError(f"{what} folder does not exist: {spec} (a hub id has the form org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, _, revision = str(spec).partition("@")
    cache = hub_cache()
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if _offline():
        raise InputError(f"{what} {spec}: not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; "
                         f"download it where the hub can be reached (huggingface-cli download {repo}) or pass a "
                         "local folder")
    try:
        return Path(snapshot_download(repo, revision=revision or None, cache_dir=cache, allow_patterns=_PATTERNS))
    except GatedRepoError:
        raise InputError(f"{what} {spec}: gated on the hub: accept its conditions at https://huggingface.co/{repo} "
                         "and log in (huggingface-cli login, or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise InputError(f"{what} {spec}: no such model on the hub (or it is private: log in with "
                         "huggingface-cli login, or set HF_TOKEN), and no local folder of that name") from None
    except RevisionNotFoundError:
        raise InputError(f"{what} {spec}: the hub has no revision '{revision}' of {repo}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise InputError(f"{what} {spec}: not in the local Hugging Face cache ({cache}) and the hub could not be "
                         f"reached ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
