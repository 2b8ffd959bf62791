"""Checkpoints named by a Hugging Face Hub id, and the expert names of Ai2's released FlexOlmo models.

:func:`resolve_checkpoint` turns what a user passes as a checkpoint (a local directory or a Hub
id such as ``"allenai/FlexOlmo-7x7B-1T"``) into a local directory. It is the one resolver of
the package: :meth:`FlexOlmoForCausalLM.from_pretrained`, ``flexmoe generate --model`` and the
transformers integration all call it. Downloads go through ``huggingface_hub.snapshot_download``
(an optional dependency) and fetch only JSON, safetensors and tokenizer files, never pickles.

:func:`released_expert_names` gives the expert names of a released checkpoint whose
``config.json`` has none (:data:`RELEASED_EXPERT_NAMES`).
"""
from __future__ import annotations

import os
import re
from typing import Mapping, Optional, Union

from .config import read_json_object

__all__ = [
    "ALLOW_PATTERNS",
    "RELEASED_EXPERT_NAMES",
    "RELEASED_7B_SHAPE",
    "resolve_checkpoint",
    "hub_id_of",
    "released_expert_names",
    "checkpoint_expert_names",
]

#: What a Hub download fetches: configs and indices (``*.json``, which includes
#: ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``), safetensors
#: weights and the other tokenizer files. Never ``*.bin`` / ``*.pt`` / ``*.pth`` / ``*.ckpt`` (pickles).
ALLOW_PATTERNS = ("*.json", "*.safetensors", "merges.txt", "vocab.txt", "tokenizer.model")

# "name" or "owner/name" as the Hub spells repository ids.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
# A Hub cache snapshot: .../models--{owner}--{name}/snapshots/{revision}
_CACHE_DIR = re.compile(r"^models--(?P<id>.+)$")

_SEVEN_DOMAINS = [f"expert_{i}" for i in range(1, 7)]

#: Expert names of Ai2's released FlexOlmo checkpoints, by Hub id (applied when the checkpoint's
#: ``config.json`` has no ``expert_names``; an explicit ``expert_names=`` always wins).
#:
#: Sources: the FlexOlmo README and model cards (github.com/allenai/FlexOlmo,
#: huggingface.co/allenai/FlexOlmo-7x7B-1T) and Ai2's merge script
#: (``src/scripts/upcycle/merge_experts_to_flexolmo.py``). Each ``Flex-<domain>-2x7B-1T``
#: checkpoint is the frozen public expert plus one domain expert; the merge script copies the
#: public half into expert 0 and each domain expert after it, so expert 0 is ``public``
#: everywhere and expert 1 of a 2x7B checkpoint is its domain (``pes2o`` is the academic
#: corpus, named as the checkpoint is).
#:
#: NOT VERIFIED: the order of experts 1-6 of ``FlexOlmo-7x7B-1T`` and ``FlexOlmo-7x7B-1T-RT``
#: (the RT model is the 7x7B model with a retrained router, same experts). Ai2 lists the seven
#: domains in three different orders (model summary: public, news, math, code, academic,
#: creative writing, Reddit; corpus table: public, math, news, academic, code, creative
#: writing, Reddit; model list: news, math, code, pes2o, creative, reddit) and none of them is
#: stated to be the expert order of the merged checkpoint. Rather than guess a name that opt-out
#: would then act on, those experts keep neutral names ``expert_1`` ... ``expert_6``; pass
#: ``expert_names=[...]`` once the order is known.
RELEASED_EXPERT_NAMES: dict[str, list[str]] = {
    "allenai/FlexOlmo-7x7B-1T": ["public", *_SEVEN_DOMAINS],
    "allenai/FlexOlmo-7x7B-1T-RT": ["public", *_SEVEN_DOMAINS],
    **{f"allenai/Flex-{d}-2x7B-1T": ["public", d] for d in ("math", "news", "pes2o", "code", "creative", "reddit")},
}

#: The config fields shared by every released FlexOlmo checkpoint (OLMo-2 7B sizes). A local
#: copy whose Hub id cannot be recovered is recognised by these and its ``num_experts``:
#: 7 gives the 7x7B names; 2 gives ``["public", "expert_1"]`` (which domain is unknown).
RELEASED_7B_SHAPE = {"model_type": "flex_olmo", "vocab_size": 100352, "hidden_size": 4096,
                     "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}


def _looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` is spelled as a Hub repository id (and not as a filesystem path)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "~")) and ".." not in name


def resolve_checkpoint(
    name_or_path: Union[str, os.PathLike],
    *,
    revision: Optional[str] = None,
    cache_dir: Union[None, str, os.PathLike] = None,
    local_files_only: bool = False,
    token: Union[None, bool, str] = None,
    argument: str = "name_or_path",
) -> str:
    """The local checkpoint directory for ``name_or_path``: a directory or a Hub id.

    An existing directory is returned as is (the Hub options are then unused). Otherwise a
    name spelled as a Hub id (``"owner/name"``) is fetched with
    ``huggingface_hub.snapshot_download(repo_id, revision=, cache_dir=, local_files_only=,
    token=, allow_patterns=ALLOW_PATTERNS)``: only JSON, safetensors and tokenizer files, never
    pickles; a cached snapshot is used without network access, and ``local_files_only=True``
    never touches the network. ``argument`` is the name errors give the value (e.g.
    ``"--model"``).

    Raises ``NotADirectoryError`` naming ``argument`` for an existing file, and
    ``FileNotFoundError`` naming ``argument`` and the value when it is neither an existing
    directory nor a Hub id, when ``huggingface_hub`` is not installed, when the
    download fails (unknown id or revision, no network, not cached with ``local_files_only``)
    and when the snapshot has no ``config.json``.
    """
    raw = os.fspath(name_or_path)
    if os.path.isdir(raw):
        return raw
    if os.path.exists(raw):
        raise NotADirectoryError(f"{argument}={raw!r} is a file, not a checkpoint directory")
    if not isinstance(raw, str) or not _looks_like_hub_id(raw):
        raise FileNotFoundError(f"{argument}: checkpoint directory {raw!r} does not exist "
                                f"(and it is not spelled as a Hugging Face Hub id, owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{argument}={raw!r} is not a local directory; to download it as a Hugging Face Hub id "
            f"install huggingface_hub (pip install huggingface_hub)") from None
    try:
        local = snapshot_download(raw, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                  token=token, allow_patterns=list(ALLOW_PATTERNS))
    except Exception as exc:  # the hub client's errors: unknown repo / revision, offline, not cached
        where = f" at revision {revision!r}" if revision else ""
        how = ("is not in the local Hugging Face cache (local_files_only)" if local_files_only
               else "could not be fetched from the Hugging Face Hub")
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"{argument}={raw!r} is not a local directory and {how}{where}: "
                                f"{type(exc).__name__}: {why}") from exc
    local = os.fspath(local)
    if not os.path.isfile(os.path.join(local, "config.json")):
        raise FileNotFoundError(f"{argument}={raw!r}: the Hub snapshot {local!r} has no config.json "
                                f"(only {', '.join(ALLOW_PATTERNS)} are downloaded; pickle weights never are)")
    return local


def hub_id_of(name_or_path: Union[str, os.PathLike], config: Optional[Mapping] = None) -> Optional[str]:
    """The Hub id a checkpoint came from, when it can be told: ``name_or_path`` itself when it is
    spelled as a Hub id and is not a local directory; the id encoded in a Hub cache path
    (``.../models--owner--name/snapshots/REV``); else ``config["_name_or_path"]`` when that is a
    Hub id. None otherwise."""
    raw = os.fspath(name_or_path)
    if not os.path.isdir(raw) and _looks_like_hub_id(raw):
        return raw
    parts = os.path.normpath(os.path.abspath(raw)).split(os.sep)
    if len(parts) >= 3 and parts[-2] == "snapshots":
        m = _CACHE_DIR.match(parts[-3])
        if m:
            return m.group("id").replace("--", "/")
    named = (config or {}).get("_name_or_path")
    return named if isinstance(named, str) and _looks_like_hub_id(named) else None


def released_expert_names(hub_id: Optional[str], config: Mapping) -> Optional[list[str]]:
    """Expert names for a checkpoint whose config (a ``config.json`` dict) has no ``expert_names``.

    Looks ``hub_id`` up in :data:`RELEASED_EXPERT_NAMES` (the entry is used only when its length
    equals the config's ``num_experts``); otherwise a config with the released checkpoints'
    shape (:data:`RELEASED_7B_SHAPE`) and 7 or 2 experts gets ``public`` for expert 0 and
    ``expert_i`` for the others. None when the config names its experts or nothing matches.
    """
    if config.get("expert_names"):
        return None
    n = config.get("num_experts", config.get("num_local_experts"))
    names = RELEASED_EXPERT_NAMES.get(hub_id or "")
    if names is not None and len(names) == n:
        return list(names)
    if n in (2, 7) and all(config.get(k) == v for k, v in RELEASED_7B_SHAPE.items()):
        return ["public", *[f"expert_{i}" for i in range(1, n)]]
    return None


def checkpoint_expert_names(name_or_path: Union[str, os.PathLike],
                            directory: Union[str, os.PathLike]) -> Optional[list[str]]:
    """:func:`released_expert_names` for a resolved checkpoint: ``name_or_path`` is what the
    user passed (a Hub id or a path), ``directory`` what :func:`resolve_checkpoint` returned.
    Reads ``directory/config.json`` (None when it is absent: the loader reports that)."""
    path = os.path.join(os.fspath(directory), "config.json")
    if not os.path.isfile(path):
        return None
    config = read_json_object(path)
    hub_id = hub_id_of(name_or_path, config) or hub_id_of(directory, config)
    return released_expert_names(hub_id, config)
