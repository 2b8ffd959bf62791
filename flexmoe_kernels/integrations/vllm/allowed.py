"""Per-request allowed expert sets for serving: parsing, validation, canonical form, cache salt.

Pure Python (no vLLM, no torch), so the front end, the worker and the tests share one parser.

A request names the experts it may use in ``SamplingParams.extra_args["allowed_experts"]``
(OpenAI API: ``vllm_xargs``). Accepted forms:

* a list of expert names (the checkpoint's ``expert_names``) and/or indices (ints in ``[0, E)``);
* a comma-separated string of names and/or indices (``"public,code"`` or ``"0,2"``): the
  OpenAI API's ``vllm_xargs`` passes only strings, numbers and lists of them;
* absent (or ``None``): every expert.

Refused (``ValueError``, whose message names the field and the value): a value of another
type, an entry that is neither a name nor an int (bool included), an unknown name, an index
out of range, a duplicate (the same expert twice, by name or index), and a set with fewer
experts than the model's top-k (docs/SEMANTICS.md §2.5: every token needs K allowed experts).

The canonical form is the sorted tuple of indices. A set naming every expert is canonicalised
to ``None`` (no restriction), so it shares the prefix cache with requests that give no field.
"""
from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["FIELD", "AllowedExpertsError", "parse_allowed_experts", "cache_salt", "encode_canonical",
           "decode_canonical"]

FIELD = "allowed_experts"
# prefix of the canonical worker-side value (front end -> engine) and of the cache salt
_CANON_PREFIX = "flexmoe-allowed:"


class AllowedExpertsError(ValueError):
    """An invalid ``allowed_experts`` value; ``parameter`` / ``value`` say which."""

    def __init__(self, message: str, value: object = None):
        super().__init__(message)
        self.parameter = FIELD
        self.value = value


def _entries(value: object) -> list:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",")]
        if value.strip() == "" or any(p == "" for p in parts):
            raise AllowedExpertsError(
                f"{FIELD}: {value!r} is not a comma-separated list of expert names or indices "
                f"(an empty entry)", value)
        return [int(p) if p.lstrip("-").isdigit() else p for p in parts]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise AllowedExpertsError(
        f"{FIELD} must be a list of expert names or indices, or a comma-separated string; "
        f"got {type(value).__name__} {value!r}", value)


def parse_allowed_experts(value: object, expert_names: Sequence[str], top_k: int) -> Optional[tuple[int, ...]]:
    """The canonical allowed set of ``value``: a sorted tuple of expert indices, or ``None``
    when every expert is allowed (``value`` is None or names all E experts).

    Raises :class:`AllowedExpertsError` (a ``ValueError``) naming the field and the value.
    """
    if value is None:
        return None
    names = list(expert_names)
    E = len(names)
    index_of = {n: i for i, n in enumerate(names)}
    seen: dict[int, object] = {}
    for entry in _entries(value):
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise AllowedExpertsError(
                f"{FIELD}: entry {entry!r} ({type(entry).__name__}) is neither an expert name nor an index; "
                f"experts: {names}", value)
        if isinstance(entry, int):
            if not 0 <= entry < E:
                raise AllowedExpertsError(
                    f"{FIELD}: index {entry} is out of range [0, {E}) (experts: {names})", value)
            idx = entry
        else:
            if entry not in index_of:
                raise AllowedExpertsError(f"{FIELD}: unknown expert name {entry!r} (experts: {names})", value)
            idx = index_of[entry]
        if idx in seen:
            raise AllowedExpertsError(
                f"{FIELD}: expert {names[idx]!r} (index {idx}) is given twice ({seen[idx]!r} and {entry!r})", value)
        seen[idx] = entry
    if len(seen) < top_k:
        raise AllowedExpertsError(
            f"{FIELD}: {value!r} allows {len(seen)} expert(s) but the model routes each token to "
            f"top-k={top_k}; allow at least {top_k}", value)
    if len(seen) == E:
        return None
    return tuple(sorted(seen))


def encode_canonical(indices: Optional[tuple[int, ...]]) -> Optional[str]:
    """The value the front end hands to the engine for a canonical set (None: no restriction)."""
    if indices is None:
        return None
    return _CANON_PREFIX + ",".join(map(str, indices))


def decode_canonical(value: object, num_experts: int) -> Optional[tuple[int, ...]]:
    """Inverse of :func:`encode_canonical` (worker side). Raises ``ValueError`` for anything
    else (the front end always canonicalises, so that means a request that bypassed it)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(_CANON_PREFIX):
        raise ValueError(f"{FIELD} value {value!r} did not pass the front end's validation")
    idx = tuple(int(p) for p in value[len(_CANON_PREFIX):].split(","))
    if not idx or any(not 0 <= i < num_experts for i in idx):
        raise ValueError(f"{FIELD} value {value!r} names experts outside [0, {num_experts})")
    return idx


def cache_salt(indices: Optional[tuple[int, ...]], user_salt: Optional[str] = None) -> Optional[str]:
    """The KV-cache salt of a request: the user's own salt (if any) joined with the allowed set,
    so that KV blocks are shared only between requests with the same set (and salt). ``None``
    for an unrestricted request without a salt (it keeps sharing the cache with every such
    request)."""
    if indices is None:
        return user_salt
    tag = encode_canonical(indices)
    return tag if user_salt is None else f"{user_salt}|{tag}"
