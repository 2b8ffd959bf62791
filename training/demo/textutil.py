"""Text helpers of the demo corpora: normalisation, cutting into documents, roff stripping, reading files.

Re-exported by :mod:`.corpora` (``corpora.strip_roff`` etc.).
"""
from __future__ import annotations

import gzip
import re
from typing import List, Optional

__all__ = ["normalise_text", "split_into_documents", "strip_roff", "read_text", "ascii_share"]


def normalise_text(text: str) -> str:
    """Normalise line endings, strip trailing spaces and runs of > 2 blank lines, drop NULs."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def ascii_share(text: str) -> float:
    if not text:
        return 0.0
    return sum(1 for c in text if ord(c) < 128) / len(text)


def split_into_documents(text: str, doc_bytes: int, min_bytes: int) -> List[str]:
    """Cut ``text`` into pieces of at most about ``doc_bytes`` UTF-8 bytes at line boundaries.

    Pieces shorter than ``min_bytes`` are dropped (the tail of a file, tiny files). A single
    line longer than ``doc_bytes`` is kept whole in its own piece.
    """
    if doc_bytes <= 0 or min_bytes < 0:
        raise ValueError(f"doc_bytes must be > 0 and min_bytes >= 0, got {doc_bytes}, {min_bytes}")
    docs: List[str] = []
    cur: List[str] = []
    size = 0
    for line in text.split("\n"):
        n = len(line.encode("utf-8")) + 1
        if cur and size + n > doc_bytes:
            docs.append("\n".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += n
    if cur:
        docs.append("\n".join(cur))
    out = []
    for d in docs:
        d = d.strip("\n")
        if len(d.encode("utf-8")) >= min_bytes:
            out.append(d)
    return out


_ROFF_CHARS = {
    "em": "--", "en": "-", "aq": "'", "dq": '"', "co": "(c)", "rg": "(R)", "bu": "*",
    "lq": '"', "rq": '"', "oq": "'", "cq": "'", "hy": "-", "mi": "-", "pl": "+", "mu": "x",
    "ga": "`", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "ba": "|", "or": "|", "fm": "'",
    "de": " degrees", "tm": "(TM)", ">=": ">=", "<=": "<=", "->": "->", "<-": "<-",
}
_TEXT_MACROS = {"SH", "SS", "B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "IP", "TP", "Nm", "Nd", "Sh"}


def _roff_escapes(s: str) -> str:
    s = re.sub(r"\\f(\(..|\[[^\]]*\]|.)", "", s)           # font changes
    s = re.sub(r"\\s[+-]?\d", "", s)                        # size changes
    s = re.sub(r"\\\*(\(..|\[[^\]]*\]|.)", "", s)          # strings (\*(C`)
    s = re.sub(r"\\\((..)", lambda m: _ROFF_CHARS.get(m.group(1), ""), s)
    s = re.sub(r"\\\[([^\]]*)\]", lambda m: _ROFF_CHARS.get(m.group(1), ""), s)
    s = re.sub(r"\\[hvwlLoxkzbNHSXY]'[^']*'", "", s)       # motions etc.
    s = re.sub(r"\\[nk](\(..|\[[^\]]*\]|.)", "", s)        # registers
    s = s.replace("\\-", "-").replace("\\e", "\x01").replace("\\ ", " ").replace("\\~", " ")
    s = s.replace("\\&", "").replace("\\|", "").replace("\\^", "").replace("\\,", "").replace("\\/", "")
    s = s.replace("\\c", "").replace("\\%", "").replace("\\:", "").replace("\\0", " ")
    s = re.sub(r"\\(.)", r"\1", s)
    return s.replace("\x01", "\\")


def strip_roff(src: str) -> str:
    """Turn a roff manual page into plain text (macros dropped, text kept, escapes resolved).

    Handles the common ``man``/``mdoc`` macros well enough for language modelling; it is not
    a renderer. Macro definitions (``.de`` .. ``..``) and conditionals are dropped.
    """
    out: List[str] = []
    in_def = False
    for raw in src.split("\n"):
        line = raw.rstrip()
        if in_def:
            if line.startswith(".."):
                in_def = False
            continue
        if line.startswith(".de ") or line.startswith(".de\t") or re.match(r"^\.\s*de\s", line):
            in_def = True
            continue
        if line.startswith(".\\\"") or line.startswith("'\\\"") or line.startswith("\\\""):
            continue
        if line.startswith(".") or line.startswith("'"):
            m = re.match(r"^[.']\s*([A-Za-z]{1,3})\b\s*(.*)$", line)
            if not m:
                continue
            name, rest = m.group(1), m.group(2)
            if name in ("SH", "SS", "Sh"):
                out.append("")
                out.append(_roff_escapes(rest.replace('"', "")).strip().upper() if name != "SS" else _roff_escapes(rest.replace('"', "")).strip())
            elif name in ("PP", "LP", "P", "Pp", "sp", "br", "TP"):
                out.append("")
            elif name in _TEXT_MACROS and rest:
                out.append(_roff_escapes(rest.replace('"', "")).strip())
            continue
        if "\\{" in line or "\\}" in line:
            continue
        out.append(_roff_escapes(line))
    return normalise_text("\n".join(out))


def read_text(path: str, limit: int = 1 << 20) -> Optional[str]:
    """Read a (possibly gzipped) text file as UTF-8; None if unreadable, binary or not UTF-8."""
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read(limit)
        else:
            with open(path, "rb") as f:
                data = f.read(limit)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if b"\x00" in data[:4096]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
