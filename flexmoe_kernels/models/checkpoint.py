"""Hugging Face FlexOlmo checkpoints: atomic save, safetensors-only load, tensor hashing.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
``model-0000i-of-0000n.safetensors`` listed in ``model.safetensors.index.json``. Experts are
read in the fused layout (``mlp.experts.gate_up_proj`` (E, 2F, D), ``mlp.experts.down_proj``
(E, D, F)) or the older per-expert layout (``mlp.experts.{e}.{gate,up,down}_proj.weight``:
(F, D), (F, D), (D, F)), which is also what ``transformers`` 5 writes. We always write fused.
Weights are read with ``safetensors`` only: never ``torch.load`` / pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import Iterable, Mapping, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..utils.fs import atomic_directory
from .config import CheckpointError, FlexOlmoConfig, read_json_object

__all__ = [
    "save_pretrained",
    "save_state_dict",
    "ShardWriter",
    "parse_size",
    "write_config",
    "LazyStateDict",
    "TensorMapping",
    "lazy_state_dict",
    "load_state_dict",
    "convert_state_dict",
    "tensors_sha256",
    "CheckpointError",
    "SINGLE_FILE",
    "INDEX_FILE",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# Files a save owns (replaced); anything else found in an existing target directory is carried over.
_OWNED = re.compile(r"^(config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
                    r"model-\d+-of-\d+\.safetensors)$")
_PER_EXPERT = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<e>\d+)\.(?P<which>gate|up|down)_proj\.weight$")
# Keys some older checkpoints carry that hold no weights.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------- hashing
def tensors_sha256(state_dict: Mapping[str, torch.Tensor], names: Optional[Iterable[str]] = None) -> str:
    """Stable hex sha256 over named tensors (default: all), independent of device and dict order.

    For each name in sorted order it hashes the name, dtype, shape and the raw little-endian
    bytes of the contiguous tensor, so equal hashes mean bit-identical tensors. Raises
    ``KeyError`` naming any requested name that is absent.
    """
    keys = sorted(state_dict) if names is None else sorted(set(names))
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise KeyError(f"tensors_sha256: names not in state_dict: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    h = hashlib.sha256()
    for k in keys:
        t = state_dict[k]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensors_sha256: {k!r} is a {type(t).__name__}, not a tensor")
        t = t.detach().to("cpu").contiguous()
        header = f"{k}\0{str(t.dtype).replace('torch.', '')}\0{tuple(t.shape)}\0".encode()
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------- saving
def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(directory: str, staging: str) -> None:
    """Copy (hard-link where possible) the entries of ``directory`` a save does not own into ``staging``."""
    for entry in os.listdir(directory):
        if _OWNED.match(entry):
            continue
        src, dst = os.path.join(directory, entry), os.path.join(staging, entry)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            _link_or_copy(src, dst)


def _state_dict_to_save(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # as Hugging Face: the tied head is not stored
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def parse_size(size: Union[int, str], what: str = "max_shard_size") -> int:
    """Bytes of ``size``: a positive int or a string such as ``"5GB"``, ``"500MB"``, ``"64KiB"``,
    ``"1234"`` (GB/MB/KB are powers of 1000, GiB/MiB/KiB of 1024). ``ValueError`` naming ``what``."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, re.IGNORECASE)
        if m is None:
            raise ValueError(f"{what} must be bytes or a size like 5GB / 500MB, got {size!r}")
        unit = (m.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        n = int(float(m.group(1)) * base ** "BKMGT".index(unit[0]))
    else:
        raise ValueError(f"{what} must be bytes or a size like 5GB / 500MB, got {size!r}")
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {size!r}")
    return n


class ShardWriter:
    """Write tensors one at a time into ``directory`` as HF safetensors weights.

    Tensors are buffered until the next one would push the buffer past ``max_shard_size`` bytes
    (None: one file), then the buffer is written as a shard: at most one shard (or one tensor
    larger than it) is held at a time. :meth:`finish` names the files as Hugging Face does:
    ``model.safetensors`` when there is one, else ``model-0000i-of-0000n.safetensors`` and
    ``model.safetensors.index.json`` (``weight_map``, ``total_size``). ``directory`` should be a
    staging directory (:func:`flexmoe_kernels.utils.fs.atomic_directory`).
    """

    def __init__(self, directory: Union[str, os.PathLike], max_shard_size: Optional[int] = None):
        if max_shard_size is not None and (isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int)
                                           or max_shard_size <= 0):
            raise ValueError(f"max_shard_size must be a positive int (bytes) or None, got {max_shard_size!r}")
        self.directory, self.max_shard_size = os.fspath(directory), max_shard_size
        self._buf: dict[str, torch.Tensor] = {}
        self._size = 0
        self._files: list[tuple[str, list[str]]] = []  # (temporary file name, keys)
        self.total_size = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (copied to contiguous CPU memory) under ``key``."""
        if key in self._buf or any(key in keys for _, keys in self._files):
            raise ValueError(f"tensor {key!r} written twice")
        t = tensor.detach().to("cpu").contiguous()
        n = t.numel() * t.element_size()
        if self._buf and self.max_shard_size is not None and self._size + n > self.max_shard_size:
            self._flush()
        self._buf[key] = t
        self._size += n
        self.total_size += n

    def _flush(self) -> None:
        # the first shard is written as model.safetensors (renamed by finish() when more follow)
        name = SINGLE_FILE if not self._files else f"model-{len(self._files) + 1:05d}.partial.safetensors"
        save_file(self._buf, os.path.join(self.directory, name), metadata={"format": "pt"})
        self._files.append((name, list(self._buf)))
        self._buf, self._size = {}, 0

    def finish(self) -> list[str]:
        """Write the last shard, name the files and the index; returns the weight file names."""
        if self._buf or not self._files:
            self._flush()
        n = len(self._files)
        if n == 1:
            return [SINGLE_FILE]
        weight_map = {}
        for i, (tmp, keys) in enumerate(self._files):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.directory, tmp), os.path.join(self.directory, fname))
            weight_map.update({k: fname for k in keys})
        with open(os.path.join(self.directory, INDEX_FILE), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))},
                      fh, indent=2)
        return sorted({f for f in weight_map.values()})


def write_config(directory: Union[str, os.PathLike], config: FlexOlmoConfig, dtype: torch.dtype) -> None:
    """``config.json`` of ``config`` with ``dtype`` (the tensors' dtype) into ``directory``."""
    cfg = config.to_dict()
    cfg["dtype"] = str(dtype).replace("torch.", "")
    with open(os.path.join(os.fspath(directory), CONFIG_FILE), "w", encoding="utf-8") as fh:
        fh.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_state_dict(config: FlexOlmoConfig, tensors: Union[Mapping[str, torch.Tensor],
                                                           Iterable[tuple[str, torch.Tensor]]],
                    directory: Union[str, os.PathLike], max_shard_size: Union[None, int, str] = None,
                    dtype: Optional[torch.dtype] = None) -> None:
    """Write an HF checkpoint of ``config`` from ``tensors`` (HF names; a mapping, or an iterable
    of ``(name, tensor)`` consumed one at a time) into ``directory`` atomically (see
    :func:`save_pretrained`), in shards of at most ``max_shard_size`` (bytes or ``"5GB"``; None:
    one file). A lazy mapping (:func:`lazy_state_dict`) or a generator keeps at most one shard
    in memory. The dtype recorded in ``config.json`` is ``dtype``, by default the first tensor's."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"checkpoint path {directory!r} exists and is not a directory")
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    items = ((k, tensors[k]) for k in tensors) if isinstance(tensors, Mapping) else iter(tensors)
    with atomic_directory(directory) as tmp:
        writer = ShardWriter(tmp, limit)
        for k, v in items:
            dtype = dtype or v.dtype
            writer.add(k, v)
        writer.finish()
        write_config(tmp, config, dtype or torch.float32)
        if os.path.isdir(directory):
            _carry_over(directory, tmp)


def save_pretrained(model, directory: Union[str, os.PathLike], max_shard_size: Union[None, int, str] = None) -> None:
    """Write ``config.json`` + safetensors for ``model`` into ``directory`` atomically.

    Everything is written into a fresh temporary directory next to the target, fsynced and
    swapped in by :func:`flexmoe_kernels.utils.fs.atomic_directory` (atomic
    ``renameat2(RENAME_EXCHANGE)`` on Linux, otherwise two renames); the old contents are
    deleted. An exception or crash before the swap leaves an existing checkpoint untouched. Files in an existing target that a save does
    not own (e.g. ``run.json``) are carried over. Tied ``lm_head.weight`` is not stored.
    ``max_shard_size`` (bytes, or a string such as ``"5GB"``) splits the weights into shards
    with an index, as Hugging Face does (:class:`ShardWriter`).
    """
    save_state_dict(model.config, _state_dict_to_save(model), directory, max_shard_size, dtype=model.dtype)


# ---------------------------------------------------------------------------- loading
def _tensor_files(directory: str) -> list[str]:
    single = os.path.join(directory, SINGLE_FILE)
    index = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        for k, f in weight_map.items():
            if not isinstance(f, str):
                raise CheckpointError(f"{index}: weight_map[{k!r}] is {f!r} ({type(f).__name__}), "
                                      "not a shard file name")
        files = sorted(set(weight_map.values()))
        for f in files:
            if os.path.basename(f) != f or not os.path.isfile(os.path.join(directory, f)):
                raise FileNotFoundError(f"shard {f!r} listed in {INDEX_FILE} is missing from {directory!r}")
        _check_index(directory, index, weight_map, files)
        return [os.path.join(directory, f) for f in files]
    pickles = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    hint = f" (found {pickles}: pickle checkpoints are refused, convert them to safetensors)" if pickles else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory!r}{hint}")


def _unreadable(path: str, exc: BaseException) -> CheckpointError:
    why = str(exc).replace("\n", " ")
    return CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt "
                           f"({os.path.getsize(path)} bytes; {why}); save or copy it again")


def _header_keys(path: str) -> list[str]:
    """The tensor names in the header of the safetensors file ``path`` (no tensor data is read)."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from exc


def _check_index(directory: str, index: str, weight_map: Mapping[str, str], files: list[str]) -> None:
    """``CheckpointError`` naming ``index`` and the tensor when ``weight_map`` disagrees with the
    shards' headers: a tensor mapped to a shard that does not hold it (naming where it is, also
    in a shard file the index does not list, or that none holds it), or a tensor of a listed
    shard that the index does not list. Reads the shard headers only."""
    holds = {f: set(_header_keys(os.path.join(directory, f))) for f in files}
    where: dict[str, str] = {}
    for f in files:
        for k in holds[f]:
            where.setdefault(k, f)
    for k, f in weight_map.items():
        if k in holds[f]:
            continue
        if k in where:
            raise CheckpointError(f"{index}: maps tensor {k!r} to {f!r}, which does not hold it; "
                                  f"it is in {where[k]!r}")
        found = None
        for g in sorted(os.listdir(directory)):  # a shard file the index does not list
            if g.endswith(".safetensors") and g not in holds and os.path.isfile(os.path.join(directory, g)):
                try:
                    if k in _header_keys(os.path.join(directory, g)):
                        found = g
                        break
                except CheckpointError:
                    continue
        raise CheckpointError(f"{index}: maps tensor {k!r} to {f!r}, which does not hold it; "
                              + (f"it is in {found!r}, a file the index does not list" if found
                                 else f"no shard of {directory!r} holds it"))
    unlisted = sorted(k for k in where if k not in weight_map)
    if unlisted:
        more = f" (+{len(unlisted) - 1} more)" if len(unlisted) > 1 else ""
        raise CheckpointError(f"{index}: shard {where[unlisted[0]]!r} holds tensor {unlisted[0]!r}{more}, "
                              "which the index does not list")


def _read_safetensors(path: str, sd: dict[str, torch.Tensor]) -> None:
    """Add the tensors of the safetensors file ``path`` to ``sd`` (cloned: own, aligned memory,
    not a view of the file buffer). ``CheckpointError`` naming the file when it is truncated or
    corrupt (safetensors checks that the header is valid and its offsets cover the file
    exactly; the tensor bytes carry no checksum) or repeats a tensor of another shard."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for k in f.keys():
                if k in sd:
                    raise CheckpointError(f"tensor {k!r} appears in more than one shard ({os.path.basename(path)})")
                sd[k] = f.get_tensor(k).clone()
    except (SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from exc


def load_state_dict(directory: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or shards), on CPU, as stored.

    Raises ``FileNotFoundError`` when there is no weights file (pickles are refused) and
    :class:`CheckpointError` naming the file for invalid JSON in the shard index or a
    truncated / corrupt safetensors file.
    """
    sd: dict[str, torch.Tensor] = {}
    for path in _tensor_files(os.fspath(directory)):
        _read_safetensors(path, sd)
    return sd


class TensorMapping(Mapping):
    """Base of the read-only, lazy ``name -> tensor`` mappings (a checkpoint on disk, an
    ``olmo2`` checkpoint under our names, the public view of an MoE, tensors computed on access):
    a fixed list of names set by :meth:`_set_keys`, membership, iteration in that order and
    length. Subclasses give ``__getitem__`` (calling :meth:`_known` first)."""

    def _set_keys(self, keys: Iterable[str]) -> None:
        self._keys = list(keys)
        self._keyset = set(self._keys)

    def _known(self, key: str) -> None:
        """``KeyError(key)`` unless ``key`` is one of the mapping's names."""
        if key not in self._keyset:
            raise KeyError(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keyset


class LazyStateDict(TensorMapping):
    """The tensors of a checkpoint directory (single file or shards), read one at a time on access.

    A ``Mapping`` from HF names to CPU tensors as stored: ``sd[name]`` opens the file holding
    ``name`` and reads that tensor only (nothing is cached), so iterating holds one tensor at a
    time. With ``num_experts`` the older per-expert layout is presented fused, as
    :func:`convert_state_dict` does (``...mlp.experts.gate_up_proj`` is read from its pieces on
    access); names in ``skip`` are left out. :meth:`shape` / :meth:`dtype` read the file headers
    only. Errors as
    :func:`load_state_dict` (missing files, corrupt headers, a tensor in two shards).
    """

    def __init__(self, directory: Union[str, os.PathLike], num_experts: Optional[int] = None,
                 skip: Iterable[str] = ()):
        self.directory = os.fspath(directory)
        self._where: dict[str, str] = {}
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in _tensor_files(self.directory):
            try:
                with safe_open(path, framework="pt", device="cpu") as f:
                    for k in f.keys():
                        if k in self._where:
                            raise CheckpointError(f"tensor {k!r} appears in more than one shard "
                                                  f"({os.path.basename(path)})")
                        sl = f.get_slice(k)
                        self._where[k] = path
                        self._meta[k] = (tuple(sl.get_shape()), sl.get_dtype())
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt "
                                      f"({str(exc).strip()}); save or copy it again") from exc
        self._fused: dict[str, list[str]] = {}  # fused key -> stored per-expert pieces of its layer
        keys, skip = [], set(skip)
        for k in self._where:
            m = _PER_EXPERT.match(k)
            if _IGNORED.match(k) or k in skip or (m is not None and num_experts is None):
                continue
            if m is None:
                keys.append(k)
            else:
                for w in ("gate_up_proj", "down_proj"):
                    self._fused.setdefault(f"{m['prefix']}.{w}", []).append(k)
        self.num_experts = num_experts
        self._set_keys(keys + sorted(self._fused))

    def _read(self, key: str) -> torch.Tensor:
        path = self._where[key]
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                return f.get_tensor(key).clone()
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({str(exc).strip()})") from exc

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._fused:
            pieces = {k: self._read(k) for k in self._fused[key]}
            return convert_state_dict(pieces, self.num_experts)[key]
        if key not in self:
            raise KeyError(key)
        return self._read(key)

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of ``key`` from the file header (no tensor data is read)."""
        if key not in self._fused:
            if key not in self:
                raise KeyError(key)
            return self._meta[key][0]
        pieces = {k: self._meta[k][0] for k in self._fused[key]}
        e_shape = {m["which"]: s for k, s in pieces.items() if (m := _PER_EXPERT.match(k))}
        if key.endswith("gate_up_proj"):
            return (self.num_experts, e_shape["gate"][0] + e_shape["up"][0], e_shape["gate"][1])
        return (self.num_experts, *e_shape["down"])

    def dtype(self, key: str) -> torch.dtype:
        """The stored dtype of ``key`` (from the file header)."""
        name = self._fused[key][0] if key in self._fused else key
        if name not in self._meta:
            raise KeyError(key)
        return _SAFETENSORS_DTYPES[self._meta[name][1]]


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def lazy_state_dict(directory: Union[str, os.PathLike], num_experts: Optional[int] = None,
                    skip: Iterable[str] = ()) -> LazyStateDict:
    """A :class:`LazyStateDict` of ``directory``: tensors read one at a time, on access."""
    return LazyStateDict(directory, num_experts, skip)


def convert_state_dict(sd: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Fuse per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight`` into the stacked layout.

    ``gate_up_proj[e] = cat(gate[e], up[e])`` (2F, D) and ``down_proj[e] = down[e]`` (D, F).
    Raises :class:`CheckpointError` naming missing pieces or expert indices out of range.
    """
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[tuple[str, int], torch.Tensor]] = {}
    for k, v in sd.items():
        if _IGNORED.match(k):
            continue
        m = _PER_EXPERT.match(k)
        if m is None:
            out[k] = v
        else:
            groups.setdefault(m["prefix"], {})[(m["which"], int(m["e"]))] = v
    for prefix, parts in groups.items():
        bad = sorted({e for (_, e) in parts if e >= num_experts})
        if bad:
            raise CheckpointError(f"{prefix}: expert indices {bad} out of range for num_experts={num_experts}")
        missing = [f"{prefix}.{e}.{w}_proj.weight" for e in range(num_experts) for w in ("gate", "up", "down")
                   if (w, e) not in parts]
        if missing:
            raise CheckpointError(f"checkpoint is missing per-expert tensors: {missing[:10]}"
                                  f"{f' (+{len(missing) - 10} more)' if len(missing) > 10 else ''}")
        for w in ("gate_up_proj", "down_proj"):
            if f"{prefix}.{w}" in out:
                raise CheckpointError(f"{prefix} has both the fused {w} and per-expert tensors")
        try:
            out[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([parts[("gate", e)], parts[("up", e)]], 0) for e in range(num_experts)]
            )
            out[f"{prefix}.down_proj"] = torch.stack([parts[("down", e)] for e in range(num_experts)])
        except RuntimeError as exc:
            shapes = {f"{w}[{e}]": tuple(t.shape) for (w, e), t in sorted(parts.items())}
            raise CheckpointError(f"{prefix}: per-expert tensors have inconsistent shapes {shapes}") from exc
    return out


def _describe(names: list[str]) -> str:
    return ", ".join(names[:12]) + (f" (+{len(names) - 12} more)" if len(names) > 12 else "")


def _check_against(model, sd: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected or mis-shaped tensors."""
    want = model.state_dict()
    tied = model.config.tie_word_embeddings
    if tied and "lm_head.weight" in sd:
        head, emb = sd.pop("lm_head.weight"), sd.get("model.embed_tokens.weight")
        if emb is not None and (head.shape != emb.shape or not torch.equal(head, emb)):
            raise CheckpointError(
                "tie_word_embeddings is set but the checkpoint's lm_head.weight differs from "
                "model.embed_tokens.weight"
            )
    missing = sorted(k for k in want if k not in sd and not (tied and k == "lm_head.weight"))
    extra = sorted(k for k in sd if k not in want)
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
        for k in sd if k in want and tuple(sd[k].shape) != tuple(want[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing tensors: {_describe(missing)}")
    if extra:
        problems.append(f"unexpected tensors: {_describe(extra)}")
    if shapes:
        problems.append(f"tensors of the wrong shape: {_describe(shapes)}")
    nonfloat = sorted(k for k, v in sd.items() if k in want and not v.is_floating_point())
    if nonfloat:
        problems.append(f"non-floating-point tensors: {_describe(nonfloat)}")
    if problems:
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(problems))
