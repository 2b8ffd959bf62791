"""Issue 14 item 3, released checkpoints: a Hub id resolves through ``huggingface_hub`` (no
network here: ``snapshot_download`` is replaced, or reads a local cache with
``local_files_only``), pickles are never fetched, the released checkpoints' expert names come
from the documented table, and ``flexmoe generate`` runs on a transformers checkpoint with a
``tokenizer.json`` built here with the ``tokenizers`` library."""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import sys

import pytest
import torch

from flexmoe_kernels.models import FlexOlmoForCausalLM, resolve_checkpoint
from flexmoe_kernels.models import hub

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["hello", "world", "the", "expert", "news", "code", "math", "a", "is", "of"]
SPECIALS = ["[UNK]", "<|endoftext|>", "<|pad|>", "<s>"]  # ids 0..3


def write_tokenizer(directory, bos_template: bool = False, tokenizer_config: dict | None = None) -> None:
    """A tiny word-level ``tokenizer.json`` (ids: specials 0..3, then WORDS), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    if bos_template:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    tok.save(os.path.join(directory, "tokenizer.json"))
    if tokenizer_config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as fh:
            json.dump(tokenizer_config, fh)


def hf_checkpoint(directory, num_experts: int = 2, **config) -> str:
    """A tiny random transformers FlexOlmo checkpoint (no ``expert_names`` in its config.json)
    with a ``tokenizer.json``; returns ``directory``."""
    transformers = pytest.importorskip("transformers")
    base = dict(vocab_size=len(SPECIALS) + len(WORDS), hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_experts=num_experts, num_experts_per_tok=min(2, num_experts),
                pad_token_id=2, eos_token_id=1, bos_token_id=None, initializer_range=0.3)
    base.update(config)
    torch.manual_seed(0)
    transformers.FlexOlmoForCausalLM(transformers.FlexOlmoConfig(**base)).save_pretrained(directory)
    write_tokenizer(directory)
    return str(directory)


class FakeSnapshotDownload:
    """Stands in for ``huggingface_hub.snapshot_download``: records its calls, returns ``folder``."""

    def __init__(self, folder):
        self.folder, self.calls = str(folder), []

    def __call__(self, repo_id, **kwargs):
        self.calls.append({"repo_id": repo_id, **kwargs})
        return self.folder


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """A Hub whose every id downloads to one tiny 2-expert transformers checkpoint."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    fake = FakeSnapshotDownload(hf_checkpoint(tmp_path / "snapshot"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake


# ---------------------------------------------------------------------------- resolving
def test_hub_id_goes_through_snapshot_download_without_pickles(fake_hub, tmp_path):
    model = FlexOlmoForCausalLM.from_pretrained("allenai/Flex-math-2x7B-1T", revision="v1",
                                                cache_dir=tmp_path / "cache", local_files_only=True)
    (call,) = fake_hub.calls
    assert call["repo_id"] == "allenai/Flex-math-2x7B-1T" and call["revision"] == "v1"
    assert call["cache_dir"] == tmp_path / "cache" and call["local_files_only"] is True
    patterns = call["allow_patterns"]
    fetched = lambda f: any(fnmatch.fnmatch(f, p) for p in patterns)  # noqa: E731
    for f in ("pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt", "training_args.bin",
              "pytorch_model-00001-of-00002.bin", "optimizer.pt"):
        assert not fetched(f), f
    for f in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert fetched(f), f
    assert model.expert_names == ["public", "math"]  # the table, keyed by the Hub id


def test_local_directory_never_reaches_the_hub(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    fake = FakeSnapshotDownload(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    d = hf_checkpoint(tmp_path / "allenai" / "Flex-math-2x7B-1T")  # spelled like the id, but local
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("allenai/Flex-math-2x7B-1T") == "allenai/Flex-math-2x7B-1T"
    assert FlexOlmoForCausalLM.from_pretrained(d).expert_names == ["expert_0", "expert_1"]  # no id: no names
    assert fake.calls == []


def _cache_snapshot(cache, repo_id: str, source: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Lay ``source``'s files out as the Hugging Face cache holds a downloaded snapshot."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as fh:
        fh.write(commit)
    shutil.copytree(source, os.path.join(repo, "snapshots", commit))
    return os.path.join(repo, "snapshots", commit)


def test_local_files_only_reads_the_cache_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "cache"
    snap = _cache_snapshot(cache, "allenai/Flex-code-2x7B-1T", hf_checkpoint(tmp_path / "src"))
    got = resolve_checkpoint("allenai/Flex-code-2x7B-1T", cache_dir=cache, local_files_only=True)
    assert os.path.samefile(got, snap)
    model = FlexOlmoForCausalLM.from_pretrained("allenai/Flex-code-2x7B-1T", cache_dir=cache, local_files_only=True)
    assert model.expert_names == ["public", "code"]
    # The cache path alone names the checkpoint too, and an explicit expert_names wins.
    assert FlexOlmoForCausalLM.from_pretrained(snap).expert_names == ["public", "code"]
    assert FlexOlmoForCausalLM.from_pretrained(snap, expert_names=["a", "b"]).expert_names == ["a", "b"]
    not_cached = r"name_or_path='allenai/Flex-news-2x7B-1T' is not a local directory and is not in the local Hugging"
    with pytest.raises(FileNotFoundError, match=not_cached):
        FlexOlmoForCausalLM.from_pretrained("allenai/Flex-news-2x7B-1T", cache_dir=cache, local_files_only=True)


def test_errors_name_the_argument(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"name_or_path: checkpoint directory .*nope.* does not exist"):
        FlexOlmoForCausalLM.from_pretrained(tmp_path / "nope")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="--model="):
        resolve_checkpoint(tmp_path / "f.json", argument="--model")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(FileNotFoundError, match=r"name_or_path='allenai/FlexOlmo-7x7B-1T'.*pip install hugg"):
        FlexOlmoForCausalLM.from_pretrained("allenai/FlexOlmo-7x7B-1T")


def test_snapshot_without_config_or_unreachable_is_an_error(tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeSnapshotDownload(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"--model='o/n'.*no config.json.*pickle weights never are"):
        resolve_checkpoint("o/n", argument="--model")

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"--model='o/n' is not a local directory.*revision 'r'.*couldn't"):
        resolve_checkpoint("o/n", revision="r", argument="--model")


# ---------------------------------------------------------------------------- expert names
def released_7x7b_config(**changes) -> dict:
    """The fields of allenai/FlexOlmo-7x7B-1T's config.json that the fingerprint reads."""
    cfg = {"architectures": ["FlexOlmoForCausalLM"], "model_type": "flex_olmo", "vocab_size": 100352,
           "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "num_experts": 7, "num_experts_per_tok": 7, "eos_token_id": 100257,
           "pad_token_id": 100277}
    cfg.update(changes)
    return cfg


@pytest.mark.parametrize("where", ["plain", "hub cache", "name_or_path"])
def test_released_names_for_a_local_copy(tmp_path, where):
    """A local folder whose config mimics the released 7x7B one: the table's names by id where the
    id can be told (Hub cache path, ``_name_or_path``), else by the config's fingerprint."""
    cfg = released_7x7b_config(**({"_name_or_path": "allenai/FlexOlmo-7x7B-1T-RT"} if where == "name_or_path" else {}))
    d = tmp_path / ("models--allenai--FlexOlmo-7x7B-1T/snapshots/abc" if where == "hub cache" else "copy")
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    names = hub.checkpoint_expert_names(str(d), str(d))
    assert names == ["public"] + [f"expert_{i}" for i in range(1, 7)]
    assert hub.hub_id_of(str(d), cfg) == {"plain": None, "hub cache": "allenai/FlexOlmo-7x7B-1T",
                                          "name_or_path": "allenai/FlexOlmo-7x7B-1T-RT"}[where]


def test_released_names_apply_only_when_the_config_names_none():
    named = released_7x7b_config(expert_names=list("abcdefg"))
    assert hub.released_expert_names("allenai/FlexOlmo-7x7B-1T", named) is None
    # 2x7B: the id tells the domain; the fingerprint alone only the public expert.
    two = released_7x7b_config(num_experts=2, num_experts_per_tok=2)
    assert hub.released_expert_names("allenai/Flex-reddit-2x7B-1T", two) == ["public", "reddit"]
    assert hub.released_expert_names(None, two) == ["public", "expert_1"]
    # Another shape (or a table entry whose length disagrees with num_experts) gets nothing.
    assert hub.released_expert_names(None, released_7x7b_config(hidden_size=2048)) is None
    assert hub.released_expert_names("allenai/Flex-math-2x7B-1T", {"model_type": "flex_olmo", "num_experts": 4}) is None
    for hub_id, names in hub.RELEASED_EXPERT_NAMES.items():
        assert names[0] == "public" and len(set(names)) == len(names) and len(names) in (2, 7), hub_id


# ---------------------------------------------------------------------------- tokenizer.json
def test_hf_tokenizer_special_tokens(tmp_path):
    from flexmoe_kernels.models import FlexOlmoConfig
    from flexmoe_training.demo.tokenizer import tokenizer_for

    write_tokenizer(tmp_path)
    cfg = FlexOlmoConfig(vocab_size=40, hidden_size=16, intermediate_size=12, num_hidden_layers=1,
                         num_attention_heads=2, num_experts=2, num_experts_per_tok=1, eos_token_id=[1, 2])
    tok = tokenizer_for(str(tmp_path), 40, cfg)
    hello = SPECIALS.__len__() + WORDS.index("hello")
    assert tok.eos_token_ids == [1, 2] and tok.doc_start_ids == [1]  # config's eos list; doc starts after EOS
    assert tok.encode("hello world", doc_start=True) == [1, hello, hello + 1]
    assert tok.decode([1, hello, hello + 1, 2]) == "hello world"  # special tokens dropped
    assert tok.continuation([1, hello], [hello + 1, 2]) == " world"  # the word boundary kept
    # The tokenizer's own template (BOS) starts a document; tokenizer_config.json's eos is used
    # when the config has none.
    write_tokenizer(tmp_path, bos_template=True, tokenizer_config={"eos_token": {"content": "<|pad|>"}})
    tok = tokenizer_for(str(tmp_path), 40, cfg.copy(eos_token_id=None))
    assert tok.doc_start_ids == [3] and tok.eos_token_ids == [2]
    assert tok.encode("hello", doc_start=True) == [3, hello]
    with pytest.raises(ValueError, match=r"tokenizer.json has 14 ids but the model's vocabulary has 10"):
        tokenizer_for(str(tmp_path), 10, cfg)


def test_generate_runs_on_a_transformers_checkpoint(tmp_path, capsys):
    from flexmoe_training import cli

    d = hf_checkpoint(tmp_path / "hf ckpt", num_experts=3)
    rc = cli.main(["generate", "--model", d, "hello", "--max-new-tokens", "6"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    lines = cap.out.splitlines()
    text = lines[lines.index("-" * 72) + 1]
    # The continuation decodes to words of the vocabulary, kept apart by the tokenizer's decoder
    # (special tokens are dropped, so it may be shorter than 6 words).
    assert text.split()[0] == "hello" and set(text.split()) <= set(WORDS), text
    assert "Experts that served this request (8 tokens x 2 layers)" in cap.out  # EOS + hello + 6 new
    assert "expert_2" in cap.out
    rc = cli.main(["generate", "--model", d, "hello", "--max-new-tokens", "6", "--stop-at-eos"])
    assert rc == 0


def test_generate_with_a_hub_id(fake_hub, capsys):
    from flexmoe_training import cli

    rc = cli.main(["generate", "--model", "allenai/Flex-news-2x7B-1T", "--revision", "main", "--local-files-only",
                   "hello world", "--deny", "news", "--top-k", "1", "--max-new-tokens", "3"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert fake_hub.calls[0]["revision"] == "main" and fake_hub.calls[0]["local_files_only"] is True
    assert "experts: ['public', 'news']" in cap.out and "NO" in cap.out
    rc = cli.main(["generate", "--model", "no such/dir/x", "hi"])
    assert rc == 2 and "--model: checkpoint directory 'no such/dir/x' does not exist" in capsys.readouterr().err
