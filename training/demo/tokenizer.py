"""The tokenizer the demo and ``flexmoe generate`` use.

For our own data directories and checkpoints it is the one ``flexmoe prepare-data`` used: the
training package records it (``DATA_DIR/meta.json``; checkpoints: ``tokenizer_meta.json``) and
:func:`flexmoe_training.data.load_tokenizer` rebuilds it. A Hugging Face checkpoint (no such
record, a ``tokenizer.json``) gets :class:`HFTokenizer` (the ``tokenizers`` package) with its
special tokens from the model config and ``tokenizer_config.json``. A checkpoint with neither
falls back to the byte tokenizer when the model's vocabulary fits one.

A prompt is encoded as a document's beginning: our tokenizers put an end-of-document token first
(training joins documents as ``doc EOS doc EOS ...``); a Hugging Face tokenizer puts first what
its own post-processor puts before a text (e.g. BOS), else the config's BOS, else EOS.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

__all__ = ["DemoTokenizer", "HFTokenizer", "tokenizer_for", "train_bpe"]

class DemoTokenizer:
    """Wraps a training tokenizer: ``encode(text, doc_start=False)``, ``decode(ids)``, ids."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = int(tok.vocab_size)
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = getattr(tok, "pad_token_id", None)
        eos = [] if self.eos_token_id is None else [self.eos_token_id]
        #: every id that ends a document (a Hugging Face config may list several)
        self.eos_token_ids = list(getattr(tok, "eos_token_ids", eos))
        #: the ids a document starts with (EOS for our tokenizers)
        self.doc_start_ids = list(getattr(tok, "doc_start_ids", eos))

    def encode(self, text: str, doc_start: bool = False) -> List[int]:
        """Token ids of ``text``; with ``doc_start`` preceded by ``doc_start_ids`` (a document's beginning)."""
        ids = list(self.tok.encode(text))
        return (self.doc_start_ids + ids) if doc_start else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text ``new_ids`` add after ``prompt_ids``, decoded together so that a tokenizer that
        joins words with spaces (or merges bytes across the boundary) gets the boundary right."""
        before, both = self.decode(prompt_ids), self.decode(list(prompt_ids) + list(new_ids))
        return both[len(before):] if both.startswith(before) else self.decode(new_ids)

    def special_ids(self) -> dict:
        return {"eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}


def _special_token(entry) -> Optional[str]:
    """The text of a ``tokenizer_config.json`` special-token entry (a string or ``{"content": ...}``)."""
    if isinstance(entry, dict):
        entry = entry.get("content")
    return entry if isinstance(entry, str) and entry else None


def _template_prefix(tok) -> List[int]:
    """The ids a ``tokenizers`` post-processor puts before a text (e.g. ``[BOS]``; [] for none)."""
    bare = tok.encode("a", add_special_tokens=False).ids
    full = tok.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return list(full[:i])
    return []


class HFTokenizer:
    """A Hugging Face checkpoint's ``tokenizer.json`` (``tokenizers`` package) and special tokens.

    End-of-document ids: the model config's ``eos_token_id`` (one or a list), else
    ``tokenizer_config.json``'s ``eos_token``, else the first known EOS token in the vocabulary.
    A document starts with the ids the tokenizer's post-processor puts before a text, else the
    config's ``bos_token_id`` (or ``tokenizer_config.json``'s ``bos_token``), else the EOS.
    ``decode`` drops special tokens. ``ValueError`` naming the file when it is not a valid
    ``tokenizers`` file.
    """

    kind = "hf"

    def __init__(self, directory: str, config=None):
        from flexmoe_kernels.models.config import read_json_object

        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - tokenizers is in the train extra
            raise ValueError("reading tokenizer.json needs the `tokenizers` package: pip install tokenizers") from exc
        path = os.path.join(directory, "tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as exc:  # tokenizers raises bare Exceptions for bad files
            raise ValueError(f"{path}: not a valid `tokenizers` JSON file: {exc}") from exc
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        extra = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
            f = os.path.join(directory, name)
            if os.path.isfile(f):
                extra.update(read_json_object(f))  # CheckpointError (a ValueError) naming the file
        self.eos_token_ids = self._eos_ids(config, _special_token(extra.get("eos_token")))
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        pad = getattr(config, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else self._id(_special_token(extra.get("pad_token")))
        bos = getattr(config, "bos_token_id", None)
        bos = bos if bos is not None else self._id(_special_token(extra.get("bos_token")))
        self.doc_start_ids = (_template_prefix(self._tok) or ([bos] if bos is not None else [])
                              or self.eos_token_ids[:1])

    def _id(self, token: Optional[str]) -> Optional[int]:
        tid = self._tok.token_to_id(token) if token else None
        return None if tid is None else int(tid)

    def _eos_ids(self, config, eos_token: Optional[str]) -> List[int]:
        from flexmoe_training.data import EOS_CANDIDATES

        ids = list(getattr(config, "eos_token_ids", None) or [])
        if ids:
            return ids
        for token in ([eos_token] if eos_token else []) + list(EOS_CANDIDATES):
            tid = self._id(token)
            if tid is not None:
                return [tid]
        return []

    def encode(self, text: str) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def tokenizer_for(directory: str, vocab_size: Optional[int] = None, config=None) -> DemoTokenizer:
    """The tokenizer of a data directory or checkpoint.

    Our tokenizer record (``tokenizer_meta.json`` / ``meta.json``) first; else a Hugging Face
    ``tokenizer.json`` (:class:`HFTokenizer`, special tokens from ``config``, the model's
    :class:`~flexmoe_kernels.models.FlexOlmoConfig`); else the byte tokenizer when ``vocab_size``
    (the model's) is at least the byte tokenizer's. ``ValueError`` otherwise, and when the
    ``tokenizer.json`` has more ids than ``vocab_size``.
    """
    from flexmoe_training import data as D

    has = os.path.isfile(os.path.join(directory, "tokenizer_meta.json")) or os.path.isfile(
        os.path.join(directory, "meta.json"))
    if has:
        return DemoTokenizer(D.load_tokenizer(directory))
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        tok = HFTokenizer(directory, config)
        if vocab_size is not None and tok.vocab_size > vocab_size:
            raise ValueError(f"{os.path.join(directory, 'tokenizer.json')} has {tok.vocab_size} ids but the model's "
                             f"vocabulary has {vocab_size}")
        return DemoTokenizer(tok)
    bt = D.ByteTokenizer()
    if vocab_size is not None and vocab_size >= bt.vocab_size:
        return DemoTokenizer(bt)
    raise ValueError(f"{directory!r} records no tokenizer (no tokenizer_meta.json or tokenizer.json) and its "
                     f"vocabulary ({vocab_size}) does not fit the byte tokenizer ({bt.vocab_size} ids)")


def train_bpe(texts: Sequence[str], vocab_size: int, path: str) -> str:
    """Train a small byte-level BPE tokenizer (``tokenizers``) on ``texts`` and save it to ``path``.

    Byte-level pre-tokenisation and decoding (any text round-trips), the 256 byte symbols plus
    merges up to ``vocab_size`` ids in all, and ``<|endoftext|>`` as the end-of-document token
    (``flexmoe prepare-data --tokenizer`` finds it). The demo trains it on the *public* corpus
    only, so every owner can use it without showing its data. Returns ``path``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size <= 257:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols + EOS, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tok.save(path)
    return path
