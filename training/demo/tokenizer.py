"""The tokenizer the demo and ``flexmoe generate`` use: the one ``flexmoe prepare-data`` used.

``prepare-data`` records its tokenizer in ``DATA_DIR/meta.json``; the demo copies that record
into every checkpoint it evaluates as ``CKPT_DIR/tokenizer_meta.json`` so that
``flexmoe generate --model CKPT_DIR`` decodes the same way. Two kinds are understood:

* byte-level (the default of ``prepare-data``): token id = UTF-8 byte value (0..255), special
  tokens above 255 (ids from the record, or the model config's ``bos/eos/pad_token_id``);
* a Hugging Face ``tokenizers`` JSON file (``tokenizer.json``, via ``--tokenizer``).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

__all__ = ["ByteTokenizer", "HFTokenizer", "tokenizer_from_meta", "tokenizer_for_checkpoint", "META_NAME"]

META_NAME = "tokenizer_meta.json"


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; specials (bos/eos/pad) are ids >= 256."""

    kind = "byte"

    def __init__(self, vocab_size: int = 259, bos_token_id: Optional[int] = 256, eos_token_id: Optional[int] = 257,
                 pad_token_id: Optional[int] = 258, byte_offset: int = 0):
        if vocab_size < 256 + byte_offset:
            raise ValueError(f"vocab_size must be >= {256 + byte_offset} for a byte tokenizer, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.byte_offset = int(byte_offset)

    def encode(self, text: str, bos: bool = False) -> List[int]:
        ids = [b + self.byte_offset for b in text.encode("utf-8")]
        return ([self.bos_token_id] + ids) if bos and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        o = self.byte_offset
        return bytes(i - o for i in ids if o <= i < o + 256).decode("utf-8", errors="replace")

    def special_ids(self) -> dict:
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}

    def to_meta(self) -> dict:
        return {"tokenizer": "byte", "vocab_size": self.vocab_size, "byte_offset": self.byte_offset, **self.special_ids()}


class HFTokenizer:
    """A Hugging Face ``tokenizers`` JSON tokenizer."""

    kind = "hf"

    def __init__(self, path: str, bos_token_id=None, eos_token_id=None, pad_token_id=None):
        from tokenizers import Tokenizer

        self.path = path
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id

    def encode(self, text: str, bos: bool = False) -> List[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_token_id] + ids) if bos and self.bos_token_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids))

    def special_ids(self) -> dict:
        return {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}

    def to_meta(self) -> dict:
        return {"tokenizer": self.path, "vocab_size": self.vocab_size, **self.special_ids()}


def _from_record(rec: dict, base_dir: str):
    tk = rec.get("tokenizer", "byte")
    if isinstance(tk, dict):  # nested record
        rec = dict(rec, **tk)
        tk = tk.get("kind", tk.get("type", "byte"))
    specials = {k: rec.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in rec}
    if tk in (None, "byte", "bytes", "byte-level", "byte_level"):
        kw = {"vocab_size": rec.get("vocab_size", 259), "byte_offset": rec.get("byte_offset", 0), **specials}
        return ByteTokenizer(**kw)
    path = tk if os.path.isabs(tk) else os.path.join(base_dir, tk)
    if not os.path.isfile(path) and os.path.isfile(tk):
        path = tk
    return HFTokenizer(path, **specials)


def tokenizer_from_meta(data_dir: str):
    """The tokenizer recorded in ``DATA_DIR/meta.json`` by ``flexmoe prepare-data``."""
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no meta.json in data directory {data_dir!r} (run `flexmoe prepare-data`)")
    with open(path, encoding="utf-8") as f:
        rec = json.load(f)
    return _from_record(rec, data_dir)


def tokenizer_for_checkpoint(ckpt_dir: str, config=None):
    """The tokenizer of a checkpoint: ``tokenizer_meta.json``, else ``tokenizer.json``, else bytes.

    With neither file, a byte tokenizer with the model config's vocabulary size and special ids.
    """
    meta = os.path.join(ckpt_dir, META_NAME)
    if os.path.isfile(meta):
        with open(meta, encoding="utf-8") as f:
            return _from_record(json.load(f), ckpt_dir)
    specials = {}
    vocab = 259
    if config is not None:
        vocab = config.vocab_size
        eos = config.eos_token_id[0] if isinstance(config.eos_token_id, (list, tuple)) else config.eos_token_id
        specials = {"bos_token_id": config.bos_token_id, "eos_token_id": eos, "pad_token_id": config.pad_token_id}
    tj = os.path.join(ckpt_dir, "tokenizer.json")
    if os.path.isfile(tj):
        return HFTokenizer(tj, **specials)
    return ByteTokenizer(vocab_size=max(vocab, 256), **specials)


def write_checkpoint_tokenizer(ckpt_dir: str, tok) -> None:
    """Record ``tok`` in ``CKPT_DIR/tokenizer_meta.json`` (atomic)."""
    path = os.path.join(ckpt_dir, META_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tok.to_meta(), f, indent=1)
    os.replace(tmp, path)
