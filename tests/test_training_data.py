"""prepare-data, the shard format, tokenizers and deterministic sampling (no DeepSpeed)."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from test_training_common import import_training, run_cli, write_corpus

import_training()
from flexmoe_training.data import (  # noqa: E402
    BatchSampler,
    ByteTokenizer,
    DataDir,
    DataError,
    eval_windows,
    load_tokenizer,
    prepare_data,
    read_documents,
)


@pytest.fixture
def corpus(tmp_path, seed):
    rng = random.Random(seed)
    d = write_corpus(tmp_path / "text", 23, rng)
    (d / "sub").mkdir()
    (d / "sub" / "more.jsonl").write_text("\n".join(json.dumps({"text": f"json doc {i} é ü 漢"}) for i in range(5)) + "\n")
    (d / "ignored.bin").write_bytes(b"\x00\x01")
    return d


def test_prepare_data_round_trip(corpus, tmp_path):
    meta = prepare_data(corpus, tmp_path / "data", val_fraction=0.2)
    data = DataDir(tmp_path / "data")
    assert meta["train_docs"] + meta["val_docs"] == 28
    assert meta["val_docs"] >= 1 and meta["train_docs"] >= 1
    assert data.dtype == np.uint16 and data.vocab_size == 258
    tok = load_tokenizer(tmp_path / "data")
    # Every document comes back exactly, in its split, separated by EOS.
    texts = {p.read_text() for p in corpus.glob("*.txt")} | {f"json doc {i} é ü 漢" for i in range(5)}
    got = [tok.decode(d.tolist()) for split in ("train", "val") for d in read_documents(data, split)]
    assert sorted(got) == sorted(texts)
    for split in ("train", "val"):
        toks = data.tokens(split)
        assert toks[-1] == data.eos_token_id
        assert int((np.asarray(toks) == data.eos_token_id).sum()) == meta[f"{split}_docs"]


def test_split_is_deterministic_by_content(corpus, tmp_path):
    prepare_data(corpus, tmp_path / "a", val_fraction=0.3)
    # Same documents under other names and order: the same held-out set.
    other = tmp_path / "renamed"
    other.mkdir()
    for i, p in enumerate(sorted(corpus.rglob("*"), reverse=True)):
        if p.is_file():
            (other / f"z{i}{p.suffix}").write_bytes(p.read_bytes())
    prepare_data(other, tmp_path / "b", val_fraction=0.3)
    a, b = DataDir(tmp_path / "a"), DataDir(tmp_path / "b")
    tok = ByteTokenizer()
    va = sorted(tok.decode(d.tolist()) for d in read_documents(a, "val"))
    vb = sorted(tok.decode(d.tolist()) for d in read_documents(b, "val"))
    assert va == vb and len(va) >= 1


def test_tokenizers_json(corpus, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    words = sorted({w for p in corpus.glob("*.txt") for w in p.read_text().replace(".", " ").split()})
    vocab = {"[UNK]": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(["</s>"])
    tk.save(str(tmp_path / "tok.json"))
    assert run_cli(["prepare-data", "--input", corpus, "--out", tmp_path / "data", "--tokenizer", tmp_path / "tok.json",
                    "--no-progress"]) == 0
    data = DataDir(tmp_path / "data")
    assert data.vocab_size == len(vocab) and data.eos_token_id == 1
    assert (tmp_path / "data" / "tokenizer.json").is_file()
    doc = read_documents(data, "train", 1)[0]
    assert doc.max() < len(vocab) and (doc != 0).sum() > 0
    assert load_tokenizer(tmp_path / "data").decode(doc[:3].tolist()).split()[0] in vocab


def test_bad_inputs_leave_nothing(tmp_path, capsys):
    assert run_cli(["prepare-data", "--input", tmp_path / "missing", "--out", tmp_path / "out"]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run_cli(["prepare-data", "--input", tmp_path / "empty", "--out", tmp_path / "out"]) == 2
    assert "no documents" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jsonl").write_text('{"text": "ok"}\nnot json\n')
    assert run_cli(["prepare-data", "--input", tmp_path / "bad", "--out", tmp_path / "out"]) == 2
    assert "x.jsonl:2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_undecodable_bytes_counted_and_binary_skipped(tmp_path, capsys):
    """Issue 12 item 6d: prepare-data counts the bytes it replaces with U+FFFD per file and warns
    (naming the file and the count); binary files (NUL bytes) are skipped with a message."""
    src = tmp_path / "text"
    (src / "sub").mkdir(parents=True)
    (src / "good.txt").write_text("plain UTF-8 text, é ü 漢\n", encoding="utf-8")
    (src / "latin.txt").write_bytes("café naïve façade\n".encode("latin-1"))  # 3 undecodable bytes
    (src / "sub" / "blob.txt").write_bytes(b"\x7fELF\x02\x01\x00\x00binary\xff\xfe")
    (src / "mixed.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "bad \xe9\xe8 bytes"}\n')  # 2
    assert run_cli(["prepare-data", "--input", src, "--out", tmp_path / "data", "--val-fraction", "0"]) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    latin = [ln for ln in lines if "latin.txt" in ln]
    assert len(latin) == 1 and "3 undecodable byte" in latin[0] and "U+FFFD" in latin[0]
    mixed = [ln for ln in lines if "mixed.jsonl" in ln]
    assert len(mixed) == 1 and "2 undecodable byte" in mixed[0]
    blob = [ln for ln in lines if "blob.txt" in ln]
    assert len(blob) == 1 and "binary" in blob[0] and "skip" in blob[0]
    assert not any("good.txt" in ln for ln in lines)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert meta["train_docs"] == 4  # good, latin, two jsonl lines; not the binary file
    assert meta["replaced_bytes"] == {"latin.txt": 3, "mixed.jsonl": 2}
    assert meta["skipped_binary"] == ["sub/blob.txt"]
    text = load_tokenizer(tmp_path / "data").decode(DataDir(tmp_path / "data").tokens("train").tolist())
    assert "binary" not in text and "caf\ufffd na\ufffdve fa\ufffdade" in text


def test_corrupt_data_dir(corpus, tmp_path):
    prepare_data(corpus, tmp_path / "data")
    with open(tmp_path / "data" / "train.bin", "r+b") as f:
        f.truncate(101)
    with pytest.raises(DataError, match="train.bin"):
        DataDir(tmp_path / "data")
    with pytest.raises(DataError, match="does not exist"):
        DataDir(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="meta.json"):
        DataDir(tmp_path / "plain")


def test_sampler_deterministic_and_rank_slices(corpus, tmp_path, seed):
    prepare_data(corpus, tmp_path / "a")
    data = DataDir(tmp_path / "a")
    s1 = BatchSampler([data], seq_len=16, micro_batch_size=2, grad_accum=2, world_size=1, seed=seed)
    s2 = BatchSampler([data], seq_len=16, micro_batch_size=2, grad_accum=1, world_size=2, seed=seed)
    g = s1.global_batch(7)
    assert g.shape == (4, 17) and g.dtype == torch.int64
    assert torch.equal(g, s1.global_batch(7)) and not torch.equal(g, s1.global_batch(8))
    toks = torch.from_numpy(np.asarray(data.tokens("train"), dtype=np.int64))
    for row in g:  # every row is a real window of the shard
        starts = [i for i in range(len(toks) - 16) if torch.equal(toks[i:i + 17], row)]
        assert starts
    # Micro-batch (micro m, rank r) of 2 ranks = micro-step (r) of 1 rank: same global batch.
    single = torch.cat([s1.micro_batch(7, m, 0) for m in range(2)])
    multi = torch.cat([s2.micro_batch(7, 0, r) for r in range(2)])
    assert torch.equal(single, multi) and torch.equal(single, g)
    w = eval_windows([data], 16, 3)
    assert w.shape[1] == 17 and 1 <= w.shape[0] <= 3
    with pytest.raises(DataError, match="seq_len"):
        BatchSampler([data], seq_len=10**7, micro_batch_size=1, grad_accum=1, world_size=1, seed=0)


@pytest.mark.parametrize("line,what", [
    ('{"text": 5}', "is a number (5)"),
    ('{"text": null}', "is null"),
    ('{"text": ["a", "b"]}', "is a list"),
    ('{"text": {"a": 1}}', "is an object"),
    ('{"text": true}', "is a boolean (true)"),
    ('["text", "x"]', "not a JSON object"),
    ('{"txt": "x"}', 'no "text" field'),
    ("not json", "not valid JSON"),
])
def test_a_bad_jsonl_line_is_an_error_naming_file_line_and_what_is_wrong(tmp_path, capsys, line, what):
    """Issue 21 item 13: every bad line of a *.jsonl file is an error naming file:line and what is wrong
    (``{"text": 5}`` used to be skipped without a word); nothing is written."""
    src = tmp_path / "text"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a document\n")
    (src / "sub" / "x.jsonl").write_text('{"text": "fine"}\n\n' + line + '\n{"text": "later"}\n')
    assert run_cli(["prepare-data", "--input", src, "--out", tmp_path / "out", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flexmoe: error: --input: {src / 'sub' / 'x.jsonl'}:3: ") and "\n" not in err, err
    assert what in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text"]


def test_empty_jsonl_texts_are_skipped_like_empty_files(tmp_path, capsys):
    """An empty or blank "text" is an empty document, skipped as an empty *.txt file is (documented)."""
    src = tmp_path / "text"
    src.mkdir()
    (src / "x.jsonl").write_text('{"text": "one"}\n{"text": ""}\n{"text": "  \\n "}\n{"text": "two"}\n')
    (src / "empty.txt").write_text("\n")
    assert run_cli(["prepare-data", "--input", src, "--out", tmp_path / "data", "--val-fraction", "0",
                    "--no-progress"]) == 0
    assert json.loads((tmp_path / "data" / "meta.json").read_text())["train_docs"] == 2


def test_an_out_under_a_regular_file_names_the_flag_and_the_file(tmp_path, capsys):
    """Issue 21 item 13: ``--out FILE/sub`` (FILE a regular file) used to say only "[Errno 17] File exists"."""
    src = tmp_path / "text"
    src.mkdir()
    (src / "a.txt").write_text("a document\n")
    blocker = tmp_path / "FILE"
    blocker.write_text("keep me\n")
    for out in (blocker / "sub", blocker / "sub" / "deeper"):
        assert run_cli(["prepare-data", "--input", src, "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"flexmoe: error: --out {str(out)!r}: {str(blocker)!r} is a file") and "\n" not in err
        assert "a file is in the way" in err, err
    assert run_cli(["prepare-data", "--input", src, "--out", blocker, "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"flexmoe: error: --out {str(blocker)!r} is an existing file, not a directory"), err
    assert blocker.read_text() == "keep me\n"
