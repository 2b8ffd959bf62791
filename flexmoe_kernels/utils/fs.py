"""Atomic, fsynced file and directory replacement: the one implementation in the project.

Contract shared by every helper here: the target is either left exactly as it was (any
exception, or a crash, before the final rename) or holds the complete new contents; temporary
files and directories are siblings of the target named ``.<name>.tmp-<host>-<pid>-<random>``
(``.old-`` for a replaced directory on its way out) and are removed on failure. New contents are
fsynced before they are renamed into place, and the parent directory is fsynced after, so the
replacement survives a power loss.

A process killed mid-write cannot remove its temporary sibling; the next write to the same
target (and :func:`flexmoe_kernels.models.checkpoint` loads) call
:func:`remove_stale_temporaries`, which deletes the siblings of *that* target whose writer is
gone: same host, process id no longer running. Other hosts' temporaries (a shared file
system) and live writers' are left alone, and nothing but the target's own pattern is touched.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator, Union

__all__ = ["atomic_directory", "fsync_path", "fsync_tree", "remove_stale_temporaries", "replace_directory",
           "temp_prefix", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]

PathLike = Union[str, os.PathLike]


def _host() -> str:
    """This host's name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"


def temp_prefix(name: str, kind: str = "tmp") -> str:
    """Prefix of this process's temporary siblings of ``name``: ``.<name>.<kind>-<host>-<pid>-``."""
    return f".{name}.{kind}-{_host()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(target: PathLike) -> list[str]:
    """Delete the temporary siblings of ``target`` left by writers that died (see the module
    docstring); returns the removed paths. Only names ``.<target name>.tmp-<host>-<pid>-*`` /
    ``.old-`` of this host whose process is gone are removed."""
    target = os.path.abspath(os.fspath(target))
    parent, name = os.path.split(target)
    pattern = re.compile(rf"^\.{re.escape(name)}\.(?:tmp|old)-{re.escape(_host())}-(\d+)-")
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        path = os.path.join(parent, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(path)
        removed.append(path)
    return removed


def fsync_path(path: PathLike, directory: bool = False) -> None:
    """fsync a file (or, with ``directory``, a directory entry); best effort: errors are ignored
    (some file systems cannot fsync a directory)."""
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(os.fspath(path), flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: PathLike) -> None:
    """fsync every regular file and directory under ``root`` (``root`` included); links are skipped."""
    for dirpath, _dirnames, filenames in os.walk(os.fspath(root)):
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                fsync_path(p)
        fsync_path(dirpath, directory=True)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a!r}, {b!r}) failed: {os.strerror(err)}")


def replace_directory(staging: PathLike, target: PathLike, *, fsync: bool = True) -> None:
    """Move the finished directory ``staging`` to ``target``, replacing what ``target`` held.

    ``staging`` must be on the same file system as ``target`` (a sibling is best). With
    ``fsync`` every file under ``staging`` is fsynced first. An existing ``target`` is swapped
    out in one step (``renameat2(RENAME_EXCHANGE)`` on Linux, else two renames) and then
    deleted; the parent directory is fsynced at the end. On return ``staging`` no longer exists.
    Raises ``NotADirectoryError`` when ``target`` exists and is not a directory,
    ``FileNotFoundError`` when ``staging`` is not a directory.
    """
    staging, target = os.path.abspath(os.fspath(staging)), os.path.abspath(os.fspath(target))
    if not os.path.isdir(staging):
        raise FileNotFoundError(f"staging directory {staging!r} does not exist")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"target {target!r} exists and is not a directory")
    if fsync:
        fsync_tree(staging)
    parent, name = os.path.split(target)
    old = None
    if not os.path.exists(target):
        os.rename(staging, target)
    elif _exchange(staging, target):
        old = staging  # staging now holds the previous contents
    else:
        old = tempfile.mkdtemp(prefix=temp_prefix(name, "old"), dir=parent)
        os.rmdir(old)
        os.rename(target, old)
        os.rename(staging, target)
    if fsync:
        fsync_path(parent, directory=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: PathLike, *, mode: int = 0o755, fsync: bool = True) -> Iterator[Path]:
    """Build a directory that replaces ``target`` atomically when the ``with`` block succeeds.

    Yields an empty staging directory (a hidden sibling of ``target``, permissions ``mode``);
    write the new contents there. On normal exit it replaces ``target`` via
    :func:`replace_directory`; on an exception the staging directory is removed and ``target``
    is left untouched. The parent of ``target`` is created when missing.
    """
    target = Path(os.path.abspath(os.fspath(target)))
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    staging = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name), dir=target.parent))
    try:
        os.chmod(staging, mode)
        yield staging
        replace_directory(staging, target, fsync=fsync)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_bytes_atomic(path: PathLike, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (a temporary sibling, fsynced, renamed into place)."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(name), dir=parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_path(parent, directory=True)


def write_text_atomic(path: PathLike, text: str, *, fsync: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, text.encode("utf-8"), fsync=fsync)


def write_json_atomic(path: PathLike, obj, *, indent: int = 2, fsync: bool = True, **dumps_kwargs) -> None:
    """Write ``json.dumps(obj, indent=indent, **dumps_kwargs)`` plus a newline to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, **dumps_kwargs) + "\n", fsync=fsync)
