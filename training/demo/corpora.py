"""Demo corpora built from real text that is already on the machine (no downloads, no synthetic data).

One *public* corpus and N *owner* ("closed") domains. Each source is a function that yields
``(origin, text)`` pairs from files found on this machine; texts are cut into documents of about
``doc_bytes`` bytes at line boundaries, normalised, deduplicated by SHA-256 (within and across
domains: the first domain that claims a document keeps it), and split into train / held-out test
by the hash of the document, so the split is deterministic and does not depend on file order.

Sources (the preference orders below decide which are used; a source that is missing or too small
on this machine is skipped and the next one is taken, and the manifest says what happened):

========== ==================================================================================
name        what
========== ==================================================================================
web         the broad public corpus (public by default): prose plus some text of every kind,
            as web data holds some of everything (:data:`WEB_MIX`): prose (``readmes``), Python
            source of installed packages (``pycode``, site-packages: disjoint from the owners'
            standard library), and the *public part* of every shared source below
readmes     English prose: package descriptions (``*.dist-info/METADATA`` bodies) and
            ``/usr/share/doc/*/README*``                                  (public by default)
code        Python standard-library source (``sysconfig.get_paths()["stdlib"]``)
man         manual pages (``/usr/share/man/man[1-8]``, roff markup stripped)
licenses    licence / copyright texts (``*.dist-info/LICENSE*``, ``/usr/share/doc/*/copyright``,
            ``/usr/share/common-licenses``)
pydoc       Python's documentation topics (``pydoc_data.topics``)
changelogs  Debian / upstream change logs (``/usr/share/doc/*/changelog*``)
c_headers   C headers (``/usr/include``)
pycode      Python source of installed packages (site-packages; public only)
========== ==================================================================================

Shared sources (man, licenses, pydoc, changelogs, c_headers) are split *by file*: a file whose
path hashes into the public part (:func:`public_part`, one file in :data:`PUBLIC_SHARE`) can only
go to the public ``web`` corpus, every other file only to an owner, so the public corpus and the
owners never read the same file; documents are then also deduplicated across domains (the public
corpus is built first and keeps a shared document).

Layout of a built corpus (cached; rebuilt only when the key inputs change)::

    CORPUS_DIR/manifest.json            sources used, doc counts / bytes per domain and split
    CORPUS_DIR/<domain>/train.jsonl     {"id", "origin", "text"} one document a line
    CORPUS_DIR/<domain>/test.jsonl      held-out documents (never given to training)
    CORPUS_DIR/web/pool.jsonl           public documents the public model never trains on (the
                                        owners' proxies and the router-tuning sample come from it)
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import site
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from flexmoe_kernels.utils.fs import write_text_atomic

from .textutil import ascii_share, normalise_text, read_text, split_into_documents, strip_roff

__all__ = [
    "CorpusSpec",
    "proxy_pool",
    "PUBLIC_SHARE",
    "WEB_MIX",
    "public_part",
    "Document",
    "SOURCES",
    "PUBLIC_PREFERENCE",
    "OWNER_PREFERENCE",
    "build_corpora",
    "load_manifest",
    "read_documents",
    "strip_roff",
    "split_into_documents",
    "normalise_text",
]

FORMAT_VERSION = 3


# ----------------------------------------------------------------------------- sources
def _site_dirs() -> List[str]:
    dirs: List[str] = []
    try:
        dirs += list(site.getsitepackages())
    except AttributeError:  # pragma: no cover - virtualenv quirk
        pass
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:  # pragma: no cover
        pass
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    seen, out = set(), []
    for d in dirs:
        d = os.path.realpath(d)
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            out.append(d)
    return out


def _files(patterns: Iterable[str], recursive: bool = False) -> List[str]:
    out = set()
    for p in patterns:
        out.update(f for f in glob.glob(p, recursive=recursive) if os.path.isfile(f))
    return sorted(out)


def _iter_files(paths: List[str], transform: Callable[[str, str], Optional[str]] = lambda p, t: t) -> Iterator[Tuple[str, str]]:
    for p in paths:
        t = read_text(p)
        if t is None:
            continue
        t = transform(p, t)
        if t:
            yield p, t


def _metadata_body(path: str, text: str) -> Optional[str]:
    # METADATA is an e-mail style header block, a blank line, then the long description.
    parts = text.split("\n\n", 1)
    if len(parts) < 2:
        return None
    body = parts[1]
    return body if ascii_share(body) > 0.97 else None


def src_readmes() -> Tuple[List[str], Callable[[List[str]], Iterator[Tuple[str, str]]]]:
    meta = _files([os.path.join(d, "*.dist-info", "METADATA") for d in _site_dirs()])
    readmes = _files(["/usr/share/doc/*/README*"])

    def it(paths):
        for p, t in _iter_files(paths, lambda p, t: _metadata_body(p, t) if p.endswith("METADATA") else (t if ascii_share(t) > 0.97 else None)):
            yield p, t
    return meta + readmes, it


def src_code():
    stdlib = sysconfig.get_paths()["stdlib"]
    files = [f for f in _files([os.path.join(stdlib, "**", "*.py")], recursive=True)
             if "site-packages" not in f and "dist-packages" not in f and os.path.getsize(f) < 400_000]
    return files, lambda paths: _iter_files(paths)


def src_pycode():
    """Python source of installed packages (site-packages): the public corpus's code, disjoint from the stdlib."""
    files = [f for f in _files([os.path.join(d, "**", "*.py") for d in _site_dirs()], recursive=True)
             if os.path.getsize(f) < 400_000]
    return files, lambda paths: _iter_files(paths)


def src_man():
    files = _files([f"/usr/share/man/man{i}/*" for i in range(1, 9)])

    def tr(p, t):
        if t.startswith(".so ") or len(t) < 200:
            return None  # a redirect to another page
        txt = strip_roff(t)
        return txt if ascii_share(txt) > 0.97 else None
    return files, lambda paths: _iter_files(paths, tr)


def src_licenses():
    pats = []
    for d in _site_dirs():
        pats += [os.path.join(d, "*.dist-info", "LICEN[CS]E*"), os.path.join(d, "*.dist-info", "COPYING*"),
                 os.path.join(d, "*.dist-info", "licenses", "**", "*")]
    pats += ["/usr/share/doc/*/copyright", "/usr/share/common-licenses/*"]
    files = _files(pats, recursive=True)
    return files, lambda paths: _iter_files(paths, lambda p, t: t if ascii_share(t) > 0.97 else None)


def src_pydoc():
    try:
        from pydoc_data.topics import topics
    except Exception:  # pragma: no cover - stripped Python builds
        return [], lambda paths: iter(())
    keys = sorted(topics)
    return [f"pydoc_data.topics:{k}" for k in keys], lambda paths: ((p, topics[p.split(":", 1)[1]]) for p in paths)


def src_changelogs():
    files = _files(["/usr/share/doc/*/changelog*", "/usr/share/doc/*/NEWS*"])
    return files, lambda paths: _iter_files(paths, lambda p, t: t if ascii_share(t) > 0.97 else None)


def src_c_headers():
    files = [f for f in _files(["/usr/include/**/*.h"], recursive=True) if os.path.getsize(f) < 400_000]
    return files, lambda paths: _iter_files(paths)


@dataclass(frozen=True)
class Source:
    name: str
    description: str
    find: Callable  # () -> (list of origins, iterator factory over a list of origins)
    shared: bool = False  # files split by path hash between the public corpus and an owner


# One file in PUBLIC_SHARE of a shared source belongs to the public corpus (by the hash of its path).
PUBLIC_SHARE = 4


def public_part(origin: str) -> bool:
    """True when the file (or topic) ``origin`` of a shared source belongs to the public corpus."""
    return int(hashlib.sha256(origin.encode("utf-8")).hexdigest()[:8], 16) % PUBLIC_SHARE == 0


# The public "web" corpus: (kind, source, share of the bytes). Prose takes what the others leave;
# at most WEB_DOCS_PER_FILE documents come from one file.
WEB_DOCS_PER_FILE = 2
WEB_MIX: List[Tuple[str, str, float]] = [
    ("code", "pycode", 0.12), ("documentation", "pydoc", 0.08), ("licences", "licenses", 0.10),
    ("manual pages", "man", 0.12), ("headers", "c_headers", 0.08), ("changelogs", "changelogs", 0.08),
    ("prose", "readmes", 1.0),
]


SOURCES: Dict[str, Source] = {
    s.name: s
    for s in [
        Source("web", "broad public text: prose and some of every kind (code, documentation, licences, manual "
                      "pages, headers, changelogs) from files no owner reads", lambda: ([], lambda paths: iter(()))),
        Source("readmes", "English prose: package descriptions (dist-info METADATA) and /usr/share/doc READMEs", src_readmes),
        Source("code", "Python standard-library source code", src_code),
        Source("man", "manual pages (/usr/share/man, roff stripped)", src_man, shared=True),
        Source("licenses", "licence and copyright texts of installed packages", src_licenses, shared=True),
        Source("pydoc", "Python documentation topics (pydoc_data.topics)", src_pydoc, shared=True),
        Source("changelogs", "package change logs (/usr/share/doc/*/changelog*)", src_changelogs, shared=True),
        Source("c_headers", "C header files (/usr/include)", src_c_headers, shared=True),
        Source("pycode", "Python source of installed packages (site-packages)", src_pycode),
    ]
}
PUBLIC_PREFERENCE = ["web", "readmes", "pydoc", "changelogs"]
OWNER_PREFERENCE = ["code", "man", "licenses", "pydoc", "changelogs", "c_headers"]


# ----------------------------------------------------------------------------- building
@dataclass
class CorpusSpec:
    """What to build. Bytes are UTF-8 bytes of document text (= tokens for a byte tokenizer)."""

    num_owners: int = 3
    owners: Optional[Sequence[str]] = None  # explicit owner sources (else OWNER_PREFERENCE)
    public: Optional[str] = None            # explicit public source (else PUBLIC_PREFERENCE)
    train_bytes: int = 1_000_000            # per domain, training split
    test_bytes: int = 60_000                # per domain, held-out split
    doc_bytes: int = 2048
    min_doc_bytes: int = 320
    test_fraction: float = 0.1
    min_train_bytes: int = 0                # a source with less training text is skipped (default min(train_bytes // 4, 200 kB))
    seed: int = 0

    def key(self) -> str:
        d = dict(self.__dict__, owners=list(self.owners) if self.owners else None, v=FORMAT_VERSION)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Document:
    id: str       # sha256 of the normalised text (first 16 hex digits)
    origin: str   # file (or topic) it came from
    text: str
    kind: str = ""  # the public corpus's kind of text (WEB_MIX); "" elsewhere


def _doc_hash(text: str) -> str:
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).hexdigest()


def _is_test(h: str, fraction: float) -> bool:
    return int(h[:8], 16) / 0xFFFFFFFF < fraction


def _collect(source: Source, spec: CorpusSpec, seen: set, log, part: Optional[bool] = None,
             kind: str = "", per_file: int = 0) -> Tuple[List[Document], List[Document], dict]:
    """Read documents from ``source`` until both splits are full; updates ``seen`` (hashes).

    ``part``: None reads every file; True / False only the files in / outside the public part
    (:func:`public_part`). ``kind`` is written into every document. ``per_file`` > 0: at most
    that many documents from one file (more files, more variety)."""
    t0 = time.time()
    try:
        origins, iterate = source.find()
    except Exception as e:  # a broken source must not break the demo
        return [], [], {"error": f"{type(e).__name__}: {e}", "files_found": 0}
    origins = [o for o in origins if part is None or public_part(o) == part]
    rng = random.Random(f"{spec.seed}:{source.name}")
    rng.shuffle(origins)
    train: List[Document] = []
    test: List[Document] = []
    nb = {"train": 0, "test": 0}
    files_read = dup = 0
    for origin, text in iterate(origins):
        files_read += 1
        pieces = split_into_documents(normalise_text(text), spec.doc_bytes, spec.min_doc_bytes)
        for piece in pieces[:per_file] if per_file > 0 else pieces:
            h = _doc_hash(piece)
            if h in seen:
                dup += 1
                continue
            seen.add(h)
            split = "test" if _is_test(h, spec.test_fraction) else "train"
            cap = spec.test_bytes if split == "test" else spec.train_bytes
            if nb[split] >= cap:
                continue
            (test if split == "test" else train).append(Document(h[:16], origin, piece, kind))
            nb[split] += len(piece.encode("utf-8"))
        if nb["train"] >= spec.train_bytes and nb["test"] >= spec.test_bytes:
            break
    # order inside a split is by hash, so the split does not depend on the file system's order
    train.sort(key=lambda d: d.id)
    test.sort(key=lambda d: d.id)
    info = {
        "files_found": len(origins),
        "files_read": files_read,
        "duplicates_dropped": dup,
        "seconds": round(time.time() - t0, 2),
    }
    return train, test, info


def _collect_web(spec: CorpusSpec, seen: set, log) -> Tuple[List[Document], List[Document], dict, List[Document]]:
    """The broad public corpus: each :data:`WEB_MIX` kind's share of the bytes from its source's
    public part (prose fills what the others leave); updates ``seen``. Returns (train, test, info,
    pool): twice ``spec.train_bytes`` of training-split documents are read and split in two by
    document hash, ``train`` (the public model's data) and ``pool`` (public text the public model
    never trains on: where owners pick their proxies for router tuning). ``info["composition"]``
    gives docs and bytes per kind and split, ``info["kind_errors"]`` why a kind gave nothing."""
    spec = CorpusSpec(**dict(spec.__dict__, train_bytes=2 * spec.train_bytes))
    train: List[Document] = []
    test: List[Document] = []
    info: dict = {"files_found": 0, "files_read": 0, "duplicates_dropped": 0, "seconds": 0.0, "composition": {},
                  "kind_errors": {}}
    for kind, name, share in WEB_MIX:
        left_tr = spec.train_bytes - sum(len(d.text.encode()) for d in train)
        left_te = spec.test_bytes - sum(len(d.text.encode()) for d in test)
        sub = CorpusSpec(**dict(spec.__dict__, train_bytes=max(0, min(left_tr, int(share * spec.train_bytes))),
                                test_bytes=max(0, min(left_te, int(share * spec.test_bytes)))))
        source = SOURCES[name]
        tr, te, inf = _collect(source, sub, seen, log, part=True if source.shared else None, kind=kind,
                                per_file=WEB_DOCS_PER_FILE)
        if "error" in inf or not tr:
            info["kind_errors"][kind] = inf.get("error") or f"no documents from {inf.get('files_found', 0)} files"
        train += tr
        test += te
        for k in ("files_found", "files_read", "duplicates_dropped", "seconds"):
            info[k] = round(info[k] + inf.get(k, 0), 2)
        info["composition"][kind] = {"source": name}
    pool = sorted((d for d in train if int(d.id[-4:], 16) % 2), key=lambda d: d.id)
    train = sorted((d for d in train if not int(d.id[-4:], 16) % 2), key=lambda d: d.id)
    test.sort(key=lambda d: d.id)
    for split, docs in (("train", train), ("test", test), ("pool", pool)):
        for kind, c in info["composition"].items():
            mine = [d for d in docs if d.kind == kind]
            c[f"{split}_docs"], c[f"{split}_bytes"] = len(mine), sum(len(d.text.encode()) for d in mine)
    return train, test, info, pool


def _write_jsonl(path: str, docs: List[Document]) -> None:
    write_text_atomic(path, "".join(json.dumps({"id": d.id, "origin": d.origin, "text": d.text,
                                                **({"kind": d.kind} if d.kind else {})}, ensure_ascii=False)
                                    + "\n" for d in docs))


def read_documents(path: str) -> List[Document]:
    """Read a ``train.jsonl`` / ``test.jsonl`` / ``pool.jsonl`` written by :func:`build_corpora`."""
    with open(path, encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


def proxy_pool(corpus_dir: str, public: str) -> str:
    """The public documents owners pick proxies from: ``pool.jsonl`` (never trained on by the public
    model) when the public corpus has one, else its ``train.jsonl``."""
    pool = os.path.join(corpus_dir, public, "pool.jsonl")
    return pool if os.path.isfile(pool) else os.path.join(corpus_dir, public, "train.jsonl")


def load_manifest(corpus_dir: str) -> dict:
    with open(os.path.join(corpus_dir, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def _check_corpus_spec(spec: CorpusSpec) -> None:
    """ValueError unless ``spec.num_owners >= 1`` and every named source is in :data:`SOURCES`."""
    if spec.num_owners < 1:
        raise ValueError(f"num_owners must be >= 1, got {spec.num_owners}")
    for name in ([spec.public] if spec.public else []) + list(spec.owners or []):
        if name not in SOURCES:
            raise ValueError(f"unknown corpus source {name!r}; known: {sorted(SOURCES)}")


class _DomainWriter:
    """Builds domains one source at a time into the corpus directory ``out``.

    A source is kept when it yields at least ``min_train`` training bytes and one held-out
    document: its ``train.jsonl`` / ``test.jsonl`` are written under ``out/<name>``, its
    documents are claimed (``seen``, so no later source repeats them) and its manifest entry
    goes into ``domains``. Otherwise the reason goes into ``skipped`` and nothing is claimed.
    """

    def __init__(self, spec: CorpusSpec, out: str, log: Callable[[str], None]):
        self.spec, self.out, self.log = spec, out, log
        self.min_train = spec.min_train_bytes or min(spec.train_bytes // 4, 200_000)
        self.seen: set = set()
        self.skipped: Dict[str, str] = {}
        self.domains: Dict[str, dict] = {}

    def try_source(self, name: str, role: str) -> bool:
        """Collect source ``name`` for ``role`` ("public" / "owner"); True when it was kept."""
        local = set(self.seen)  # a skipped source must not claim documents
        pool: List[Document] = []
        if name == "web":
            train, test, info, pool = _collect_web(self.spec, local, self.log)
        else:  # an owner never reads a file of a shared source's public part
            part = False if (SOURCES[name].shared and role == "owner") else None
            train, test, info = _collect(SOURCES[name], self.spec, local, self.log, part=part)
        ntr = sum(len(d.text.encode()) for d in train)
        if ntr < self.min_train or not test:
            why = info.get("error") or (
                f"only {ntr} training bytes / {len(test)} held-out docs from {info['files_found']} files "
                f"(need >= {self.min_train} bytes and >= 1 doc)")
            self.skipped[name] = why
            self.log(f"corpora: skipping {name} as {role}: {why}")
            return False
        self.seen.update(local)
        self._write(name, role, train, test, ntr, info, pool)
        return True

    def _write(self, name: str, role: str, train: List[Document], test: List[Document], ntr: int, info: dict,
               pool: List[Document]) -> None:
        """Write a kept source's splits (and ``pool.jsonl`` when it has a pool), record its manifest
        entry and log a summary line."""
        os.makedirs(os.path.join(self.out, name), exist_ok=True)
        _write_jsonl(os.path.join(self.out, name, "train.jsonl"), train)
        _write_jsonl(os.path.join(self.out, name, "test.jsonl"), test)
        if pool:
            _write_jsonl(os.path.join(self.out, name, "pool.jsonl"), pool)
            info = dict(info, pool_docs=len(pool), pool_bytes=sum(len(d.text.encode()) for d in pool))
        self.domains[name] = {
            "role": role,
            "source": SOURCES[name].description,
            "train_docs": len(train),
            "train_bytes": ntr,
            "test_docs": len(test),
            "test_bytes": sum(len(d.text.encode()) for d in test),
            **info,
        }
        if info.get("composition"):
            self.log("corpora: " + name + " composition (train docs / kB, proxy pool docs): " + ", ".join(
                f"{k} {c['train_docs']} / {c['train_bytes'] / 1e3:.0f}, {c['pool_docs']}"
                for k, c in info["composition"].items()))
        self.log(f"corpora: {role:6s} {name:10s} {len(train):5d} train docs ({ntr / 1e3:.0f} kB), "
                 f"{len(test):4d} held-out docs, from {info['files_read']}/{info['files_found']} files "
                 f"({info['duplicates_dropped']} duplicates dropped, {info['seconds']:.1f} s)")

    def choose_public(self) -> str:
        """The first usable source of ``spec.public`` (if set) or :data:`PUBLIC_PREFERENCE`;
        RuntimeError when none is usable."""
        for name in [self.spec.public] if self.spec.public else PUBLIC_PREFERENCE:
            if self.try_source(name, "public"):
                return name
        raise RuntimeError(f"no public corpus could be built on this machine: {self.skipped}")

    def choose_owners(self, public: str) -> List[str]:
        """The first ``spec.num_owners`` usable sources of ``spec.owners`` / :data:`OWNER_PREFERENCE`
        other than ``public``; RuntimeError when fewer are usable."""
        spec = self.spec
        owners: List[str] = []
        for name in (spec.owners or OWNER_PREFERENCE):
            if len(owners) == spec.num_owners:
                break
            if name == public or name in owners:
                continue
            if self.try_source(name, "owner"):
                owners.append(name)
        if len(owners) < spec.num_owners:
            raise RuntimeError(
                f"only {len(owners)} owner domains ({owners}) could be built, {spec.num_owners} requested; "
                f"skipped: {self.skipped}")
        return owners


def build_corpora(root: str, spec: CorpusSpec, log: Callable[[str], None] = print, force: bool = False) -> str:
    """Build (or reuse) the demo corpora under ``root``; return the corpus directory.

    The public domain is the first usable source of ``spec.public`` / ``PUBLIC_PREFERENCE``,
    the owners the first ``spec.num_owners`` usable sources of ``spec.owners`` /
    ``OWNER_PREFERENCE`` (never the public one). A source is usable when it yields at least
    ``spec.min_train_bytes`` of training text and at least one held-out document. Raises
    ``RuntimeError`` naming what was found when fewer than ``num_owners`` owners are usable.
    """
    _check_corpus_spec(spec)
    out = os.path.join(root, f"corpora-{spec.key()}")
    if not force and os.path.exists(os.path.join(out, "manifest.json")):
        log(f"corpora: reusing {out}")
        return out
    os.makedirs(out, exist_ok=True)
    writer = _DomainWriter(spec, out, log)
    public = writer.choose_public()
    owners = writer.choose_owners(public)
    manifest = {
        "format_version": FORMAT_VERSION,
        "spec": dict(spec.__dict__, owners=list(spec.owners) if spec.owners else None),
        "public": public,
        "owners": owners,
        "domains": writer.domains,
        "skipped": writer.skipped,
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }
    write_text_atomic(os.path.join(out, "manifest.json"), json.dumps(manifest, indent=1))
    return out
