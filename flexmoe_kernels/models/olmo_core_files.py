"""Reading and writing OLMo-core checkpoint files, which are untrusted input (the format mapping is in
:mod:`flexmoe_kernels.models.olmo_core`).

An unsharded ``model.pt`` is read with ``torch.load(weights_only=True)`` after its zip CRCs are
checked (``torch.load`` skips them); ``model.safetensors`` with safetensors; a torch distributed
checkpoint (DCP) directory through its ``.metadata`` pickle, read with an allow-list unpickler
that also maps OLMo-core's own ``_StorageInfo`` class to torch's. A DCP's storage entries must
stay inside its directory and fit their files, and each tensor slice's CRCs are checked, so a
damaged or hostile file is named (:class:`CheckpointError`) rather than read silently.
"""
from __future__ import annotations

import io
import os
import pickle
import re
import warnings
from typing import Any, Mapping, Optional

import torch

from .config import CheckpointError

__all__ = ["read_olmo_core", "write_olmo_core"]


def _dcp_dir(path: str) -> Optional[str]:
    for cand in (path, os.path.join(path, "model_and_optim")):
        if os.path.isfile(os.path.join(cand, ".metadata")):
            return cand
    return None


def _why(exc: BaseException) -> str:
    """``Type: first line of the message`` (torch's load errors run over many lines); for
    ``torch.load(weights_only=True)``'s refusal, its reason (the first line only advises
    ``weights_only=False``, which is no advice for an untrusted file)."""
    text = str(exc).strip()
    m = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", text, re.S)
    if m:
        return f"{type(exc).__name__}: not a file of tensors torch.load(weights_only=True) reads: " \
               f"{' '.join(m.group(1).split()) or 'refused'}"
    lines = text.splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


_DCP_METADATA_CLASSES = {"Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorStorageMetadata",
                         "BytesStorageMetadata", "TensorProperties", "StorageMeta", "_MEM_FORMAT_ENCODING"}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` allowing only the checkpoint metadata classes, ``torch.Size``,
    dtypes, layouts and paths (it is a pickle: nothing else may run). OLMo-core's writer stores
    its own ``_StorageInfo`` (relative_path, offset, length), read here as torch's, so an OLMo-core
    DCP reads without ``olmo_core`` installed."""

    def find_class(self, module: str, name: str):
        import torch.distributed.checkpoint.filesystem as fs
        import torch.distributed.checkpoint.metadata as md

        if module == "torch.distributed.checkpoint.metadata" and name in _DCP_METADATA_CLASSES:
            return getattr(md, name)
        if name == "_StorageInfo" and module in ("torch.distributed.checkpoint.filesystem",
                                                 "olmo_core.distributed.checkpoint.filesystem"):
            return fs._StorageInfo
        if (module, name) in (("torch", "Size"), ("torch.serialization", "_get_layout"),
                              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a checkpoint's .metadata")


def _check_dcp_storage(directory: str, storage_data: Any, wanted: set) -> None:
    """``CheckpointError`` naming the file when a ``.metadata`` storage entry points outside
    ``directory`` (an absolute path, ``..``, a symlink leading out: refused for every entry) or,
    for the tensors in ``wanted`` (fully qualified names), at a file that is missing or shorter
    than the entry's offset + length (a truncated copy)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    if not isinstance(storage_data, Mapping):
        raise CheckpointError(f"{directory!r}: .metadata has no storage table (found {type(storage_data).__name__})")
    root = os.path.realpath(directory)
    sizes: dict[str, int] = {}
    for index, info in storage_data.items():
        fqn = getattr(index, "fqn", index)
        if not isinstance(info, _StorageInfo) or not isinstance(info.relative_path, (str, os.PathLike)):
            raise CheckpointError(f"{directory!r}: .metadata stores {fqn!r} at {info!r}, not a file entry")
        rel = os.fspath(info.relative_path)
        real = os.path.realpath(os.path.join(root, rel))
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/") or \
                os.path.commonpath([root, real]) != root:
            how = "" if real == os.path.normpath(os.path.join(root, rel)) else f" (it resolves to {real!r})"
            raise CheckpointError(f"{directory!r}: .metadata stores {fqn!r} in {rel!r}{how}, outside the "
                                  "checkpoint directory; refused")
        if fqn not in wanted:
            continue
        if rel not in sizes:
            if not os.path.isfile(real):
                raise CheckpointError(f"{os.path.join(directory, rel)!r}: missing (.metadata stores {fqn!r} in it)")
            sizes[rel] = os.path.getsize(real)
        off, n = info.offset, info.length
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (off, n)):
            raise CheckpointError(f"{directory!r}: .metadata stores {fqn!r} in {rel!r} at offset {off!r}, "
                                  f"length {n!r}: not byte counts")
        if off + n > sizes[rel]:
            raise CheckpointError(f"{os.path.join(directory, rel)!r}: truncated or damaged ({sizes[rel]} bytes; "
                                  f".metadata stores {fqn!r} at bytes {off}..{off + n})")


class _Slice(io.RawIOBase):
    """Bytes ``offset .. offset + length`` of the open file ``fh``, as a seekable file of its own."""

    def __init__(self, fh, offset: int, length: int):
        super().__init__()
        self.fh, self.offset, self.length, self.pos = fh, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = os.SEEK_SET) -> int:
        self.pos = max(0, pos + (0, self.pos, self.length)[whence])
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        self.fh.seek(self.offset + self.pos)
        got = self.fh.readinto(memoryview(b)[:n])
        self.pos += got
        return got


def _bad_crc_member(zip_file) -> Optional[str]:
    """The first member of the zip archive ``zip_file`` (a path or a seekable file) whose bytes do
    not match its CRC-32, or None. Reads each member once, in 1 MiB chunks. Only stored members are
    read (``torch.save`` stores, never compresses): a compressed one, which could inflate without
    bound, is left to ``torch.load``. Raises ``zipfile.BadZipFile`` for a damaged archive."""
    import zipfile

    with zipfile.ZipFile(zip_file) as z:
        for info in z.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                continue
            try:
                with z.open(info) as member:
                    while member.read(1 << 20):
                        pass
            except zipfile.BadZipFile as exc:
                if "CRC" in str(exc):
                    return info.filename
                raise
    return None


def _check_dcp_slice_crcs(file: str, slices: list[tuple[Any, str]]) -> None:
    """``CheckpointError`` naming ``file``, the tensor and the zip member when a tensor slice of a
    DCP file (``(_StorageInfo, fully qualified name)`` pairs; each slice is a ``torch.save`` zip archive)
    fails its CRC-32 check: ``torch.load`` does not check them. One read of the slices, in chunks.
    Slices stored through a transform (compression) or not in torch's zip format are left to torch."""
    with open(file, "rb") as fh:
        for info, fqn in slices:
            view = _Slice(fh, info.offset, info.length)
            if getattr(info, "transform_descriptors", None) or view.read(4) != b"PK\x03\x04":
                continue  # compressed, or not a zip archive (torch.load's own test): left to torch.load
            try:
                bad = _bad_crc_member(view)
            except Exception as exc:  # BadZipFile, ...: not an intact zip archive
                raise CheckpointError(f"{file!r}: the bytes of tensor {fqn!r} are damaged ({_why(exc)})") from exc
            if bad is not None:
                raise CheckpointError(f"{file!r}: member {bad!r} of tensor {fqn!r} fails its CRC-32 check (the "
                                      "file is damaged: a changed byte or a bad copy); copy it again")


def _read_dcp(directory: str) -> dict[str, torch.Tensor]:
    """The model tensors of a DCP directory (keys ``model.*`` stripped; optimizer state not read)."""
    import dataclasses
    from torch.futures import Future

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
    from torch.distributed.checkpoint.planner import LoadItemType

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(os.path.join(directory, ".metadata"), "rb") as fh:
                metadata = _MetadataUnpickler(fh).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = getattr(self, "load_id", None)
            return metadata

        def read_data(self, plan, planner):
            """torch's read, one file at a time, so that an error names the file."""
            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(os.fspath(self.storage_data[item.storage_index].relative_path), []).append(item)
            for rel, items in per_file.items():
                tensors = {i.storage_index: i for i in items if i.type == LoadItemType.TENSOR}
                _check_dcp_slice_crcs(os.path.join(directory, rel),
                                      [(self.storage_data[k], k.fqn) for k in tensors])
                try:
                    super().read_data(dataclasses.replace(plan, items=items), planner).wait()
                except Exception as exc:
                    raise CheckpointError(f"{os.path.join(directory, rel)!r}: damaged shard of the distributed "
                                          f"checkpoint ({_why(exc)})") from exc
            done: Future = Future()
            done.set_result(None)
            return done

    reader = Reader(directory)
    metadata = reader.read_metadata()
    meta = metadata.state_dict_metadata
    tensors = {k: m for k, m in meta.items() if isinstance(m, TensorStorageMetadata)}
    nested = any(k.startswith("model.") for k in tensors)
    wanted = {k for k in tensors if not nested or k.startswith("model.")}
    _check_dcp_storage(directory, metadata.storage_data, wanted)
    sd = {k[len("model."):] if nested else k: torch.empty(tuple(tensors[k].size), dtype=tensors[k].properties.dtype)
          for k in wanted}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load({"model": sd} if nested else sd, storage_reader=reader, no_dist=True)
    return sd


def _check_zip_crcs(file: str) -> None:
    """``CheckpointError`` naming ``file`` and the member whose CRC-32 does not match its bytes:
    ``torch.load`` does not check them, so a flipped byte would load silently. Reads the archive
    once, in chunks (:func:`_bad_crc_member`). A file that is not a zip archive (torch's legacy
    format, or junk) is left to ``torch.load``."""
    import zipfile

    if not zipfile.is_zipfile(file):
        return
    try:
        bad = _bad_crc_member(file)
    except Exception as exc:  # BadZipFile, EOFError, ...: whatever a damaged archive raises
        raise CheckpointError(f"{file!r}: damaged zip archive ({_why(exc)}); copy it again") from exc
    if bad is not None:
        raise CheckpointError(f"{file!r}: member {bad!r} fails its CRC-32 check (the file is damaged: a changed "
                              "byte or a bad copy); copy it again")


def read_olmo_core(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """(model state dict, directory where configs may lie) of an OLMo-core checkpoint ``path``:
    a ``.pt`` file or a directory holding ``model.pt`` (read with ``torch.load(weights_only=True)``;
    a ``{"model": ...}`` wrapper is unwrapped), a ``.safetensors`` file or a directory holding
    ``model.safetensors`` (``unshard_checkpoint(use_safetensors=True)``), or a DCP directory (``.metadata``; also a step
    directory holding ``model_and_optim/``). ``FileNotFoundError`` / :class:`CheckpointError` name ``path``
    or the damaged file (a missing or short DCP file, a storage path leaving the directory, a zip
    member failing its CRC-32)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    dcp_dir = _dcp_dir(path) if os.path.isdir(path) else None
    if dcp_dir is not None:
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            return _read_dcp(dcp_dir), os.path.abspath(path)
        except CheckpointError:
            raise
        except (Exception, CheckpointException) as exc:  # torch's own error types for a corrupt DCP
            # dcp.load wraps what a rank raised in a CheckpointException, a BaseException: unwrap it
            inner = next(iter(exc.failures.values()))[0] if isinstance(exc, CheckpointException) and \
                exc.failures else exc
            if not isinstance(inner, Exception):  # KeyboardInterrupt, SystemExit
                raise inner from None
            if isinstance(inner, CheckpointError):
                raise CheckpointError(str(inner)) from exc
            raise CheckpointError(f"{path!r}: cannot read the distributed checkpoint ({_why(inner)})") from exc
    file = path
    if os.path.isdir(path):
        file = next((os.path.join(path, f) for f in ("model.pt", "model.safetensors")
                     if os.path.isfile(os.path.join(path, f))), "")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path!r} holds neither model.pt (or model.safetensors) nor a distributed "
                                "checkpoint (.metadata)")
    try:
        if file.endswith(".safetensors"):  # unshard_checkpoint(use_safetensors=True)
            from safetensors.torch import load_file

            obj = load_file(file)
        else:
            _check_zip_crcs(file)
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # pickle / zip / safetensors errors of a corrupt or foreign file
        raise CheckpointError(f"{file!r}: not a file of tensors ({_why(exc)})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)] if isinstance(obj, dict) else ["<not a dict>"]
    if bad:
        raise CheckpointError(f"{file!r}: expected a dict of tensors, found non-tensor entries {bad[:5]}")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{file!r}: expected tensor names (strings) as keys, found {bad[:5]}")
    return obj, os.path.dirname(os.path.abspath(file))


def write_olmo_core(sd: Mapping[str, torch.Tensor], directory: str | os.PathLike, fmt: str) -> None:
    """Write OLMo-core model keys ``sd`` into the (new, empty) ``directory``: ``fmt`` 'pt' ->
    ``model.pt`` (``torch.save`` of the flat dict, as OLMo-core's ``unshard_checkpoint``), 'dcp'
    -> a distributed checkpoint with the tensors under ``model.`` (as ``save_model_and_optim_state``)."""
    directory = os.fspath(directory)
    if fmt == "pt":
        torch.save(dict(sd), os.path.join(directory, "model.pt"))
    elif fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": dict(sd)}, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    else:
        raise ValueError(f"format must be 'pt' or 'dcp', got {fmt!r}")
