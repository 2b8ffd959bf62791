"""Issue 12 item 8: the `flexmoe` command as a newcomer meets it (`--version`, `demo --help`, the
demo's log and the `flexmoe generate` commands it prints last). The time estimates and the
documentation's code blocks are checked in tests/test_docs.py."""
from __future__ import annotations

import re
import shlex
import sys
import threading
import time

import pytest

from helpers import tiny_flexolmo


def test_version(capsys):
    import flexmoe_kernels
    from flexmoe_training import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"flexmoe {flexmoe_kernels.__version__}\n"


def _option_entries(help_text: str) -> dict:
    """``{--flag: its help text}`` from an argparse help page (wrapped lines joined)."""
    entries, cur = {}, None
    for line in help_text.split("options:", 1)[1].splitlines():
        m = re.match(r"\s{2}(-\S+)", line)
        if m:
            cur = m.group(1).rstrip(",")
            entries[cur] = line
        elif cur and line.strip():
            entries[cur] += " " + line.strip()
    return {k: re.sub(r"\s+", " ", v) for k, v in entries.items()}


def test_demo_help_states_each_default_once(capsys):
    """No "(default: None)", no flag with two defaults; the sizes' steps and top-k are stated."""
    from flexmoe_training import cli
    from flexmoe_training.demo.pipeline import SIZES, DemoSettings, estimate

    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    entries = _option_entries(text)
    assert {"--public-steps", "--expert-steps", "--top-k", "--num-owners", "--jobs"} <= set(entries)
    for flag, entry in entries.items():
        assert "None" not in entry, (flag, entry)
        assert entry.count("default") <= 1, (flag, entry)
    s = DemoSettings()
    assert f"(default: {s.public_steps}; --quick {SIZES['quick']['public_steps']}, " \
           f"--scale {SIZES['scale']['public_steps']})" in entries["--public-steps"]
    assert f"(default: {s.expert_steps};" in entries["--expert-steps"]
    assert "(default: N, the number of owners)" in entries["--top-k"]
    assert estimate("default") in re.sub(r"\s+", " ", text)


def test_generate_help_states_each_default_once(capsys):
    """`flexmoe generate --help`: no "(default: None)", no flag with two defaults."""
    from flexmoe_training import cli

    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    entries = _option_entries(capsys.readouterr().out)
    assert {"--model", "--top-k", "--allow", "--deny"} <= set(entries)
    for flag, entry in entries.items():
        assert "None" not in entry, (flag, entry)
        assert entry.count("default") <= 1, (flag, entry)


def test_demo_owners_repeat_and_mix_with_commas():
    """issue 12 item 1: every expert-list flag accumulates (``--owners`` kept only its last)."""
    from flexmoe_training.cli import build_parser

    args = build_parser().parse_args(["demo", "--owners", "code,man", "--owners", "licenses"])
    assert args.owners == ["code", "man", "licenses"]


class _Terminal:
    """A stdout whose writes let other threads run, as a write to a real terminal or pipe does
    (it releases the GIL); the text written, in order."""

    def __init__(self):
        self.parts = []

    def write(self, s: str) -> int:
        self.parts.append(s)
        time.sleep(0)
        return len(s)

    def flush(self) -> None:
        time.sleep(0)


def test_demo_log_lines_never_interleave(tmp_path, monkeypatch):
    """Stages log from threads side by side: every line, on stdout and in the log file, is whole."""
    from flexmoe_training.demo.pipeline import _Log

    term = _Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    log = _Log(str(tmp_path / "demo.log"))
    n_threads, n_lines = 4, 200
    threads = [threading.Thread(target=lambda t=t: [log(f"thread {t} line {i} " + "x" * 40) for i in range(n_lines)])
               for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    pattern = re.compile(r"\[demo +\d+\.\ds\] thread (\d+) line (\d+) x{40}")
    for out in ("".join(term.parts), (tmp_path / "demo.log").read_text()):
        lines = out.splitlines()
        bad = [ln for ln in lines if not pattern.fullmatch(ln)]
        assert not bad, bad[:5]
        assert sorted(tuple(map(int, pattern.fullmatch(ln).groups())) for ln in lines) == \
            [(t, i) for t in range(n_threads) for i in range(n_lines)]


@pytest.mark.parametrize("top_k", [3, 4, 1])
def test_demo_generate_hints_run_as_printed(tmp_path, capsys, one_thread, top_k):
    """The `flexmoe generate` commands the demo prints last all exit 0 on a merged model of the
    demo's shape (public + 3 owners; the demo's top-k is 3, more than the 2 experts --allow keeps)."""
    from flexmoe_training import cli
    from flexmoe_training.demo.report import format_hints

    names = ["public", "code", "man", "licenses"]
    d = str(tmp_path / "ckpt dir" / "merged")  # a space in the path: the printed command quotes it
    tiny_flexolmo(vocab_size=258, eos_token_id=256, pad_token_id=257, num_experts_per_tok=top_k,
                  expert_names=names).save_pretrained(d)
    text = format_hints(d, names, top_k)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("flexmoe ")]
    assert len(lines) == 2 and any("--deny" in ln for ln in lines) and any("--allow" in ln for ln in lines)
    for line in lines:
        argv = shlex.split(line)
        assert argv[:2] == ["flexmoe", "generate"] and argv[argv.index("--model") + 1] == d
        rc = cli.main(argv[1:])
        cap = capsys.readouterr()
        assert rc == 0, (line, cap.err)
        assert "NO" in cap.out  # an expert was opted out
