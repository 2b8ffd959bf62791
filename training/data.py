"""Tokenised data directories: preparation, memory-mapped reading, deterministic sampling.

Legend: B batch (sequences), S sequence length, N tokens in a shard.

A prepared data directory holds::

    DATA_DIR/train.bin   token ids, np.uint16 (vocab <= 65536) or np.uint32, documents separated by EOS
    DATA_DIR/val.bin     the held-out documents (same format)
    DATA_DIR/meta.json   {"format": "flexmoe-tokens-v1", "dtype", "vocab_size", "eos_token_id",
                          "pad_token_id", "tokenizer": {...}, "train_tokens", "val_tokens",
                          "train_docs", "val_docs", "val_fraction", "source",
                          "replaced_bytes": {file: n}, "skipped_binary": [file, ...]}
    DATA_DIR/tokenizer.json   (only with a ``tokenizers`` tokenizer)

Documents are the ``*.txt`` / ``*.md`` / ``*.text`` files under the input directory (one
document each) and the lines of ``*.jsonl`` files (field ``"text"``), read in sorted path order.
Files are decoded as UTF-8; undecodable bytes (e.g. Latin-1 text) become U+FFFD, counted per
file, warned about on stderr and recorded in ``meta.json`` (``replaced_bytes``); files holding
a NUL byte are binary and skipped with a message (``skipped_binary``). Blank lines of a
``*.jsonl`` file and empty (or blank) documents are skipped; a line that is not a JSON object
with a ``"text"`` string (bad JSON, no ``"text"``, ``{"text": 5}``, ``null``, a list) is an error
naming the file and the line (:class:`DocumentError`): the input is refused, nothing is written.
A document goes to the held-out split when the first 8 bytes of the SHA-256 of its UTF-8 text,
read as an integer, fall below ``val_fraction * 2**64``: the split depends only on the text.

Sampling (:class:`BatchSampler`) is stateless: the B windows of S+1 tokens of optimizer step
``s`` are drawn by a generator seeded with ``(seed, s)``, so resuming at step ``s`` needs no
saved position other than ``s`` itself, and the global batch is the same for any world size.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from flexmoe_kernels.utils.fs import atomic_directory

__all__ = [
    "ByteTokenizer",
    "TokenizersTokenizer",
    "load_tokenizer",
    "tokenizer_from_meta",
    "iter_documents",
    "decode_counting",
    "prepare_data",
    "DataDir",
    "BatchSampler",
    "MixtureSampler",
    "eval_windows",
    "read_documents",
    "DataError",
    "DocumentError",
]

FORMAT = "flexmoe-tokens-v1"
TEXT_SUFFIXES = (".txt", ".md", ".text")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")


class DataError(ValueError):
    """A data directory or text input is missing, empty or malformed."""


# ---------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus ``<|endoftext|>`` (256, EOS) and ``<|pad|>`` (257)."""

    kind = "byte"
    vocab_size = 258
    eos_token_id = 256
    pad_token_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def meta(self) -> dict:
        return {"type": "byte", "vocab_size": self.vocab_size, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id}


class TokenizersTokenizer:
    """A Hugging Face ``tokenizers`` JSON file; EOS is ``eos_token`` or the first known EOS token found."""

    kind = "tokenizers"

    def __init__(self, path: str | os.PathLike, eos_token: Optional[str] = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - tokenizers is in the train extra
            raise RuntimeError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from exc
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {str(path)!r} does not exist")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise DataError(f"tokenizer file {str(path)!r} is not a valid `tokenizers` JSON file: {exc}") from exc
        self.path = path
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        names = [eos_token] if eos_token else list(EOS_CANDIDATES)
        self.eos_token = None
        self.eos_token_id = None
        for name in names:
            tid = self._tok.token_to_id(name)
            if tid is not None:
                self.eos_token, self.eos_token_id = name, int(tid)
                break
        if self.eos_token_id is None:
            raise DataError(
                f"tokenizer {str(path)!r} has no end-of-document token (tried {names}); pass --eos-token"
            )
        pad = None
        for name in ("<|pad|>", "<pad>", "[PAD]"):
            pad = self._tok.token_to_id(name)
            if pad is not None:
                break
        self.pad_token_id = int(pad) if pad is not None else None

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def meta(self) -> dict:
        return {"type": "tokenizers", "file": "tokenizer.json", "vocab_size": self.vocab_size,
                "eos_token": self.eos_token, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}


def tokenizer_from_meta(meta: dict, directory: str | os.PathLike):
    """Rebuild the tokenizer described by a ``meta["tokenizer"]`` entry found in ``directory``."""
    kind = meta.get("type")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "tokenizers":
        return TokenizersTokenizer(Path(directory) / meta.get("file", "tokenizer.json"), meta.get("eos_token"))
    raise DataError(f"unknown tokenizer type {kind!r} in {str(directory)!r}")


def load_tokenizer(directory: str | os.PathLike):
    """The tokenizer of a prepared data directory (``meta.json``) or of a checkpoint written by
    the training commands (``tokenizer_meta.json``). Returns an object with ``encode(str) ->
    list[int]``, ``decode(ids) -> str``, ``vocab_size``, ``eos_token_id``, ``pad_token_id``."""
    d = Path(directory)
    if (d / "tokenizer_meta.json").is_file():
        return tokenizer_from_meta(json.loads((d / "tokenizer_meta.json").read_text()), d)
    if (d / "meta.json").is_file():
        return tokenizer_from_meta(json.loads((d / "meta.json").read_text())["tokenizer"], d)
    raise DataError(f"{str(d)!r} has neither tokenizer_meta.json (checkpoint) nor meta.json (data directory)")


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> None:
    """Copy the tokenizer description of a data dir / checkpoint into ``dst_dir`` (tokenizer_meta.json
    plus tokenizer.json when the tokenizer is a ``tokenizers`` file); nothing when ``src_dir`` has none."""
    src, dst = Path(src_dir), Path(dst_dir)
    if (src / "tokenizer_meta.json").is_file():
        meta = json.loads((src / "tokenizer_meta.json").read_text())
    elif (src / "meta.json").is_file():
        meta = json.loads((src / "meta.json").read_text())["tokenizer"]
    else:
        return  # e.g. a checkpoint made elsewhere: nothing to copy
    (dst / "tokenizer_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if meta.get("type") == "tokenizers":
        shutil.copyfile(src / meta.get("file", "tokenizer.json"), dst / meta.get("file", "tokenizer.json"))


# ---------------------------------------------------------------------------- preparing
_ESCAPED = re.compile("[\udc80-\udcff]")  # one per undecodable byte under errors="surrogateescape"


def decode_counting(raw: bytes) -> tuple[str, int]:
    """``(text, n)``: ``raw`` decoded as UTF-8 with ``errors="replace"`` (each maximal invalid
    sequence becomes one U+FFFD) and ``n`` the number of undecodable bytes (0 for valid UTF-8)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        n = len(_ESCAPED.findall(raw.decode("utf-8", errors="surrogateescape")))
        return raw.decode("utf-8", errors="replace"), n


def _notice(msg: str) -> None:
    print(f"prepare-data: {msg}", file=sys.stderr, flush=True)


class DocumentError(DataError):
    """A line of a ``*.jsonl`` input file is not a JSON object with a ``"text"`` string (the message
    names the file and the line)."""


def _json_kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool) or isinstance(v, (int, float)):
        return f"a {'boolean' if isinstance(v, bool) else 'number'} ({json.dumps(v)})"
    return {list: "a list", dict: "an object"}.get(type(v), f"a {type(v).__name__}")


def _jsonl_documents(rel: str, text: str, path: str | os.PathLike | None = None) -> Iterator[tuple[str, str]]:
    """The documents of one ``*.jsonl`` file: ``(rel:line, text)``. Blank lines and empty or blank
    ``"text"`` strings are skipped (as empty ``*.txt`` files are); any other bad line is a
    :class:`DocumentError` naming ``path`` (default ``rel``), the line and what is wrong."""
    fix = 'each line of a *.jsonl file must be a JSON object with a "text" string: fix or remove the line'
    for i, line in enumerate(io.StringIO(text, newline=None)):  # the lines a text-mode open() gives
        if not line.strip():
            continue
        where = f"{os.fspath(path) if path is not None else rel}:{i + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DocumentError(f"{where}: not valid JSON ({exc}); {fix}") from exc
        if not isinstance(obj, dict):
            raise DocumentError(f"{where}: not a JSON object but {_json_kind(obj)}; {fix}")
        if "text" not in obj:
            raise DocumentError(f"{where}: no \"text\" field (fields: {', '.join(sorted(obj)[:8]) or 'none'}); {fix}")
        doc = obj["text"]
        if not isinstance(doc, str):
            raise DocumentError(f"{where}: \"text\" is {_json_kind(doc)}, not a string; {fix}")
        if doc.strip():
            yield f"{rel}:{i + 1}", doc


def iter_documents(input_dir: str | os.PathLike, report: Optional[dict] = None) -> Iterator[tuple[str, str]]:
    """Yield ``(source, text)`` for every document under ``input_dir`` in a deterministic order.

    A file with a NUL byte is binary: skipped, with a message on stderr. Undecodable bytes
    become U+FFFD; a file that had any gets one warning on stderr naming it and the count.
    ``report`` (optional dict) receives ``"replaced_bytes"`` ({file: count}) and
    ``"skipped_binary"`` ([file, ...]), files relative to ``input_dir``. A bad ``*.jsonl`` line
    raises :class:`DocumentError` naming the file and the line (see the module docstring).
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise DataError(f"input directory {str(root)!r} does not exist or is not a directory")
    report = {} if report is None else report
    replaced, binary = report.setdefault("replaced_bytes", {}), report.setdefault("skipped_binary", [])
    files = sorted(p for p in root.rglob("*") if p.is_file() and (p.suffix in TEXT_SUFFIXES or p.suffix == ".jsonl"))
    for path in files:
        rel = path.relative_to(root).as_posix()
        raw = path.read_bytes()
        if b"\0" in raw:
            binary.append(rel)
            _notice(f"skipping {rel}: a binary file (it contains NUL bytes), not text")
            continue
        text, n_bad = decode_counting(raw)
        if n_bad:
            replaced[rel] = n_bad
            _notice(f"warning: {rel}: {n_bad} undecodable byte(s) replaced with U+FFFD (not UTF-8; "
                    f"convert it, e.g. iconv -f latin1 -t utf-8)")
        if path.suffix == ".jsonl":
            yield from _jsonl_documents(rel, text, path)
        elif text.strip():
            yield rel, text


def _is_val(text: str, val_fraction: float) -> tuple[bool, int]:
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2.0**64, h


def _write_token_files(tmp: Path, docs: list, is_val: list, tok, dtype, progress: bool) -> dict:
    """Write ``tmp/train.bin`` and ``tmp/val.bin``: each document's ids + EOS as ``dtype``
    (``docs[i]`` goes to val when ``is_val[i]``). Returns ``{"train": [tokens, docs], "val": [...]}``;
    ``DataError`` when the tokenizer produces an id outside [0, vocab_size)."""
    counts = {"train": [0, 0], "val": [0, 0]}
    with open(tmp / "train.bin", "wb") as train, open(tmp / "val.bin", "wb") as val:
        files = {"train": train, "val": val}
        it = zip(docs, is_val)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(docs), desc="tokenising", unit="doc")
        for (_, text), v in it:
            part = "val" if v else "train"
            arr = np.asarray(tok.encode(text) + [tok.eos_token_id], dtype=np.int64)
            if arr.size and (arr.min() < 0 or arr.max() >= tok.vocab_size):
                raise DataError(f"tokenizer produced ids outside [0, {tok.vocab_size})")
            files[part].write(arr.astype(dtype).tobytes())
            counts[part][0] += int(arr.size)
            counts[part][1] += 1
    return counts


def prepare_data(
    input_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer=None,
    val_fraction: float = 0.05,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Tokenise the documents of ``input_dir`` into ``out_dir`` (see the module docstring).

    ``tokenizer`` defaults to :class:`ByteTokenizer`. The output directory appears atomically
    (written to a temporary sibling, then renamed); on any error nothing is left behind.
    Returns the meta dict. Binary files and undecodable bytes: see :func:`iter_documents`
    (messages on stderr; recorded in meta). When the hash split leaves the held-out set empty although
    ``val_fraction > 0`` and there are at least 2 documents, the document with the smallest
    hash is held out (still a function of the texts only).
    """
    tok = tokenizer or ByteTokenizer()
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(out)!r} already exists (pass --overwrite to replace it)")
    report: dict = {}
    docs = list(iter_documents(input_dir, report))
    if not docs:
        skipped = f" ({len(report['skipped_binary'])} binary file(s) skipped)" if report["skipped_binary"] else ""
        raise DataError(f"input directory {str(input_dir)!r} has no documents (*.txt, *.md, *.text, *.jsonl){skipped}")
    split = [_is_val(text, val_fraction) for _, text in docs]
    if val_fraction > 0 and len(docs) >= 2 and not any(v for v, _ in split):
        j = min(range(len(docs)), key=lambda i: split[i][1])
        split[j] = (True, split[j][1])
    if all(v for v, _ in split):
        raise DataError(f"all {len(docs)} documents of {str(input_dir)!r} fell into the held-out split")
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    with atomic_directory(out) as tmp:
        counts = _write_token_files(tmp, docs, [v for v, _ in split], tok, dtype, progress)
        meta = {
            "format": FORMAT,
            "dtype": np.dtype(dtype).name,
            "vocab_size": tok.vocab_size,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            "tokenizer": tok.meta(),
            "train_tokens": counts["train"][0],
            "val_tokens": counts["val"][0],
            "train_docs": counts["train"][1],
            "val_docs": counts["val"][1],
            "val_fraction": float(val_fraction),
            "source": str(Path(input_dir).resolve()),
            "replaced_bytes": report["replaced_bytes"],
            "skipped_binary": report["skipped_binary"],
        }
        if isinstance(tok, TokenizersTokenizer):
            shutil.copyfile(tok.path, tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# ---------------------------------------------------------------------------- reading
class DataDir:
    """A prepared data directory opened read-only (memory maps are created lazily)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise DataError(f"data directory {str(self.path)!r} does not exist")
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{str(self.path)!r} is not a prepared data directory (no meta.json); "
                            "run `flexmoe prepare-data --input TEXT_DIR --out DATA_DIR` first")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"{str(meta_path)!r} is not valid JSON: {exc}") from exc
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{str(meta_path)!r} has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.eos_token_id = int(self.meta["eos_token_id"])
        self._maps: dict[str, np.ndarray] = {}
        for split in ("train", "val"):
            f = self.path / f"{split}.bin"
            if not f.is_file():
                raise DataError(f"data directory {str(self.path)!r} has no {split}.bin")
            n = f.stat().st_size
            if n % self.dtype.itemsize or n // self.dtype.itemsize != int(self.meta[f"{split}_tokens"]):
                raise DataError(
                    f"{str(f)!r} has {n} bytes but meta.json says {self.meta[f'{split}_tokens']} tokens of "
                    f"{self.dtype.name}: the directory is corrupt or was only partly copied"
                )

    def tokens(self, split: str) -> np.ndarray:
        """The (N,) memory-mapped token ids of ``split`` ("train" or "val")."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if split not in self._maps:
            n = int(self.meta[f"{split}_tokens"])
            self._maps[split] = (np.memmap(self.path / f"{split}.bin", dtype=self.dtype, mode="r", shape=(n,))
                                 if n else np.zeros(0, dtype=self.dtype))
        return self._maps[split]

    def tokenizer(self):
        return tokenizer_from_meta(self.meta["tokenizer"], self.path)


def read_documents(data: DataDir, split: str = "train", max_docs: Optional[int] = None) -> list[np.ndarray]:
    """The first ``max_docs`` documents of ``split`` as int64 arrays (EOS stripped)."""
    toks = data.tokens(split)
    docs: list[np.ndarray] = []
    start = 0
    eos = np.flatnonzero(toks == data.eos_token_id)
    for end in eos:
        if end > start:
            docs.append(np.asarray(toks[start:end], dtype=np.int64))
        start = int(end) + 1
        if max_docs is not None and len(docs) >= max_docs:
            break
    return docs


def check_compatible(datas: Sequence[DataDir]) -> None:
    """All data dirs must share the tokenizer (vocab, EOS)."""
    first = datas[0]
    for d in datas[1:]:
        if d.meta["tokenizer"] != first.meta["tokenizer"]:
            raise DataError(
                f"data directories {str(first.path)!r} and {str(d.path)!r} use different tokenizers "
                f"({first.meta['tokenizer']} vs {d.meta['tokenizer']})"
            )


def _step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(step) * 7919 + salt) % (2**63 - 1))
    return g


@dataclass
class BatchSampler:
    """Deterministic, stateless sampling of windows of ``seq_len + 1`` tokens from one or more
    data directories (a mixture weighted by train-token counts).

    ``global_batch(step)`` -> (G, S+1) int64 where G = micro_batch * grad_accum * world_size;
    ``micro_batch(step, micro, rank)`` is the slice rank ``rank`` uses for micro-step ``micro``.
    """

    datas: Sequence[DataDir]
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    seed: int
    split: str = "train"

    def __post_init__(self) -> None:
        self.datas = list(self.datas)
        if not self.datas:
            raise ValueError("BatchSampler needs at least one data directory")
        check_compatible(self.datas)
        self.sizes = [len(d.tokens(self.split)) for d in self.datas]
        for d, n in zip(self.datas, self.sizes):
            if n < self.seq_len + 1:
                raise DataError(
                    f"data directory {str(d.path)!r} has {n} {self.split} tokens, fewer than "
                    f"seq_len + 1 = {self.seq_len + 1}; use a smaller --seq-len or more text"
                )
        total = float(sum(self.sizes))
        self.weights = torch.tensor([n / total for n in self.sizes], dtype=torch.float64)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def _draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(source (G,) long, position (G,) float64 in [0, 1))`` of each window of ``step``."""
        G = self.global_batch_size
        g = _step_generator(self.seed, step)
        src = torch.multinomial(self.weights, G, replacement=True, generator=g) if len(self.datas) > 1 else torch.zeros(G, dtype=torch.long)
        return src, torch.rand(G, generator=g, dtype=torch.float64)

    def sources(self, step: int) -> torch.Tensor:
        """(G,) long: the index in ``datas`` of each window of ``global_batch(step)``."""
        return self._draw(step)[0]

    def global_batch(self, step: int) -> torch.Tensor:
        G, S1 = self.global_batch_size, self.seq_len + 1
        src, u = self._draw(step)
        out = torch.empty(G, S1, dtype=torch.int64)
        for i in range(G):
            s = int(src[i])
            start = int(u[i] * (self.sizes[s] - S1 + 1))
            out[i] = torch.from_numpy(np.asarray(self.datas[s].tokens(self.split)[start:start + S1], dtype=np.int64))
        return out

    def micro_batch(self, step: int, micro: int, rank: int, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch = self.global_batch(step) if batch is None else batch
        B = self.micro_batch_size
        lo = (micro * self.world_size + rank) * B
        return batch[lo:lo + B]


MixtureSampler = BatchSampler


def eval_windows(datas: Sequence[DataDir], seq_len: int, max_windows: int,
                 splits: Sequence[str] = ("val",)) -> torch.Tensor:
    """(W, S+1) int64: consecutive non-overlapping windows of the held-out split of each data dir
    (round-robin over the dirs), at most ``max_windows``; (0, S+1) when no dir has enough tokens.
    ``splits``: which splits of each dir to read, in order (``("train", "val")``: the whole dir,
    for a validation set prepared on its own)."""
    S1 = seq_len + 1
    per: list[list[np.ndarray]] = []
    for d in datas:
        rows = []
        for split in splits:
            toks = d.tokens(split)
            n = min(len(toks) // S1, max_windows - len(rows))
            rows += [np.asarray(toks[i * S1:(i + 1) * S1], dtype=np.int64) for i in range(max(0, n))]
        per.append(rows)
    rows: list[np.ndarray] = []
    i = 0
    while len(rows) < max_windows and any(i < len(p) for p in per):
        for p in per:
            if i < len(p) and len(rows) < max_windows:
                rows.append(p[i])
        i += 1
    if not rows:
        return torch.empty(0, S1, dtype=torch.int64)
    return torch.from_numpy(np.stack(rows))
