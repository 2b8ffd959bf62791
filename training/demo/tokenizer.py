"""The tokenizer the demo and ``flexmoe generate`` use: the one ``flexmoe prepare-data`` used.

The training package records it (``DATA_DIR/meta.json``; checkpoints: ``tokenizer_meta.json``)
and :func:`flexmoe_training.data.load_tokenizer` rebuilds it. This module adds what the demo
needs on top: documents start after an end-of-document token (that is how training sees a
document's beginning: documents are joined as ``doc EOS doc EOS ...``), and a checkpoint with no
tokenizer record falls back to the byte tokenizer when the model's vocabulary fits one.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

__all__ = ["DemoTokenizer", "tokenizer_for"]


class DemoTokenizer:
    """Wraps a training tokenizer: ``encode(text, doc_start=False)``, ``decode(ids)``, ids."""

    def __init__(self, tok):
        self.tok = tok
        self.vocab_size = int(tok.vocab_size)
        self.eos_token_id = tok.eos_token_id
        self.pad_token_id = getattr(tok, "pad_token_id", None)

    def encode(self, text: str, doc_start: bool = False) -> List[int]:
        """Token ids of ``text``; with ``doc_start`` preceded by EOS (a document's beginning)."""
        ids = list(self.tok.encode(text))
        return ([self.eos_token_id] + ids) if doc_start and self.eos_token_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])

    def special_ids(self) -> dict:
        return {"eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}


def tokenizer_for(directory: str, vocab_size: Optional[int] = None) -> DemoTokenizer:
    """The tokenizer of a data directory or checkpoint.

    Falls back to the byte tokenizer when ``directory`` has no tokenizer record and
    ``vocab_size`` (the model's) is at least the byte tokenizer's; ``ValueError`` otherwise.
    """
    from flexmoe_training import data as D

    has = os.path.isfile(os.path.join(directory, "tokenizer_meta.json")) or os.path.isfile(
        os.path.join(directory, "meta.json"))
    if has:
        return DemoTokenizer(D.load_tokenizer(directory))
    bt = D.ByteTokenizer()
    if vocab_size is not None and vocab_size >= bt.vocab_size:
        return DemoTokenizer(bt)
    raise ValueError(f"{directory!r} records no tokenizer (no tokenizer_meta.json) and its vocabulary "
                     f"({vocab_size}) does not fit the byte tokenizer ({bt.vocab_size} ids)")
