"""The shared helpers: atomic replace (flexmoe_kernels.utils.fs), free_port (utils.net) and the
FLOPs-per-token formula (flexmoe_training.flops)."""
from __future__ import annotations

import json
import os
import socket

import pytest

from flexmoe_kernels.utils import fs
from flexmoe_kernels.utils.fs import atomic_directory, replace_directory, write_json_atomic, write_text_atomic
from flexmoe_kernels.utils.net import free_port


def _tree(d):
    return {p: (d / p).read_text() for p in sorted(os.listdir(d))}


@pytest.mark.parametrize("exchange", [True, False])
def test_atomic_directory_replaces_and_failure_keeps_old(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "a.txt").write_text("old")
    assert _tree(target) == {"a.txt": "old"}
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_directory(target) as d:
            (d / "a.txt").write_text("new")
            raise RuntimeError("midway")
    assert _tree(target) == {"a.txt": "old"}
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary directory left
    with atomic_directory(target) as d:
        (d / "b.txt").write_text("new")
    assert _tree(target) == {"b.txt": "new"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_replace_directory_errors_name_the_path(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "staging").mkdir()
    with pytest.raises(NotADirectoryError, match="file"):
        replace_directory(tmp_path / "staging", tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="missing"):
        replace_directory(tmp_path / "missing", tmp_path / "new")
    replace_directory(tmp_path / "staging", tmp_path / "new")
    assert (tmp_path / "new").is_dir() and not (tmp_path / "staging").exists()


def test_write_json_and_text_atomic(tmp_path, monkeypatch):
    p = tmp_path / "run.json"
    write_json_atomic(p, {"a": 1})
    assert p.read_text() == json.dumps({"a": 1}, indent=2) + "\n"

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(fs.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_text_atomic(p, "new")
    monkeypatch.undo()
    assert json.loads(p.read_text()) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["run.json"]


def test_free_port_is_bindable():
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_flops_per_token_by_hand():
    from flexmoe_kernels.models import FlexOlmoConfig
    from flexmoe_training.flops import flops_per_token

    L, D, F, V, H, kv, E, K, S = 2, 8, 16, 32, 2, 1, 3, 2, 5
    hd = D // H
    cfg = FlexOlmoConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                         num_attention_heads=H, num_key_value_heads=kv, head_dim=hd, num_experts=E,
                         num_experts_per_tok=K, tie_word_embeddings=False, expert_bias=True)
    A = 2 * L * S * H * hd
    # recipe: N_mm = active parameters without the input embedding (norms and biases included)
    per_layer = (D * H * hd * 2 + D * kv * hd * 2 + H * hd + kv * hd) + 2 * D + K * 3 * D * F + (E * D + E)
    n_mm = L * per_layer + V * D + D
    assert flops_per_token(cfg, S) == 6 * n_mm + 3 * A
    assert flops_per_token(cfg, S, 100.0) == 4 * n_mm + 3 * A + 200
    # palm: matmul weights only, 12*L*S*H*hd attention
    n_act = L * (2 * D * H * hd + 2 * D * kv * hd + E * D + K * 3 * D * F) + V * D
    assert flops_per_token(cfg, S, convention="palm") == 6 * n_act + 12 * L * S * H * hd
    with pytest.raises(ValueError, match="convention"):
        flops_per_token(cfg, S, convention="x")
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(cfg, 0)


# --------------------------------------------------------------------------- killed writers
_KILLED_WRITER = r"""
import os, signal, sys
from flexmoe_kernels.utils.fs import atomic_directory, write_text_atomic
target, kind = sys.argv[1], sys.argv[2]
if kind == "dir":
    with atomic_directory(target) as d:
        (d / "weights.bin").write_bytes(os.urandom(1 << 16))
        os.kill(os.getpid(), signal.SIGKILL)  # a kill mid-save: no cleanup code runs
else:
    import tempfile
    from flexmoe_kernels.utils import fs
    parent, name = os.path.split(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=fs.temp_prefix(name), dir=parent)  # as write_bytes_atomic does
    os.write(fd, b"partial")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _kill_mid_write(target, kind):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target), kind], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_next_write_removes_a_killed_writers_temporary(tmp_path, kind):
    """A save killed mid-way leaves its full-size temporary sibling; the next write to the same
    target removes it (and only it)."""
    target = tmp_path / ("ckpt" if kind == "dir" else "run.json")
    if kind == "dir":
        with atomic_directory(target) as d:
            (d / "weights.bin").write_text("old")
    else:
        write_text_atomic(target, "old")
    _kill_mid_write(target, kind)
    leaked = [n for n in os.listdir(tmp_path) if n.startswith(f".{target.name}.tmp-")]
    assert len(leaked) == 1, os.listdir(tmp_path)
    # Not this target's, or not stale: must survive.
    keep = [tmp_path / f".other.tmp-{fs._host()}-1-abc", tmp_path / f".{target.name}.tmp-otherhost-1-abc",
            tmp_path / f".{target.name}.tmp-{fs._host()}-{os.getpid()}-live", tmp_path / f"{target.name}.tmp-x"]
    for k in keep:
        k.mkdir()
    if kind == "dir":
        with atomic_directory(target) as d:
            (d / "weights.bin").write_text("new")
        assert (target / "weights.bin").read_text() == "new"
    else:
        write_text_atomic(target, "new")
        assert target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == sorted([target.name] + [k.name for k in keep])


def test_remove_stale_temporaries_keeps_live_writers(tmp_path):
    import subprocess
    import sys

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = tmp_path / f".t.tmp-{fs._host()}-{live.pid}-xyz"
        mine.mkdir()
        assert fs.remove_stale_temporaries(tmp_path / "t") == []
        assert mine.is_dir()
    finally:
        live.kill()
        live.wait()
    assert fs.remove_stale_temporaries(tmp_path / "t") == [str(mine)]
    assert not mine.exists()


# ============================================================================ durability (issue 21 item 17b)
# Every helper promises: new contents fsynced before they are renamed into place, the parent
# directory fsynced after. Recorded here (os.fsync, os.replace, os.rename and the renameat2
# exchange, in order) and checked for each helper, so skipping any of those fsyncs fails.


def _record_io(monkeypatch) -> list:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name the file an fsync'ed descriptor refers to")
    events = []
    real_fsync, real_replace, real_rename, real_exchange = os.fsync, os.replace, os.rename, fs._exchange

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def mover(real):
        def move(a, b, *args, **kwargs):
            ok = real(a, b, *args, **kwargs)
            if ok is not False:  # _exchange returns False when unsupported (nothing moved)
                events.append(("move", os.path.abspath(a), os.path.abspath(b)))
            return ok
        return move

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", mover(real_replace))
    monkeypatch.setattr(os, "rename", mover(real_rename))
    monkeypatch.setattr(fs, "_exchange", mover(real_exchange))
    return events


def _assert_durable(events: list, new_paths: list, target) -> None:
    """The move of new contents onto ``target`` comes after an fsync of each of ``new_paths``
    (where they were then) and before an fsync of ``target``'s directory."""
    target = os.path.abspath(target)
    moves = [i for i, e in enumerate(events) if e[0] == "move" and e[2] == target]
    assert len(moves) == 1, events
    i = moves[0]
    before = {e[1] for e in events[:i] if e[0] == "fsync"}
    for p in new_paths:
        assert os.path.abspath(p) in before, (p, events)
    after = {e[1] for e in events[i + 1:] if e[0] == "fsync"}
    assert os.path.dirname(target) in after, events


@pytest.mark.parametrize("writer", ["bytes", "text", "json"])
def test_atomic_file_writes_fsync_file_then_directory(tmp_path, monkeypatch, writer):
    events = _record_io(monkeypatch)
    p = tmp_path / "run.json"
    for _ in range(2):  # new, then replacing an existing file
        events.clear()
        {"bytes": lambda: fs.write_bytes_atomic(p, b"{}"), "text": lambda: write_text_atomic(p, "{}"),
         "json": lambda: write_json_atomic(p, {})}[writer]()
        move = next(e for e in events if e[0] == "move")
        _assert_durable(events, [move[1]], p)  # the temporary file, fsynced under its own name
    assert json.loads(p.read_text()) == {}


@pytest.mark.parametrize("how", ["new", "exchange", "two-renames"])
def test_directory_replacements_fsync_contents_then_parent(tmp_path, monkeypatch, how):
    events = _record_io(monkeypatch)
    target = tmp_path / "out"
    if how != "new":
        target.mkdir()
        (target / "old.txt").write_text("old")
    if how == "two-renames":
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "a.txt").write_text("a")
    (staging / "sub" / "b.txt").write_text("b")
    events.clear()
    replace_directory(staging, target)
    _assert_durable(events, [staging / "a.txt", staging / "sub" / "b.txt", staging / "sub", staging], target)
    assert (target / "a.txt").read_text() == "a" and (target / "sub" / "b.txt").read_text() == "b"
    assert not staging.exists() and sorted(os.listdir(tmp_path)) == ["out"]
    # atomic_directory: the same promise for what the block wrote
    events.clear()
    with atomic_directory(target) as d:
        (d / "c.txt").write_text("c")
        written = [d / "c.txt", d]
    _assert_durable(events, written, target)
    assert sorted(os.listdir(target)) == ["c.txt"]
