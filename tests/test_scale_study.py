"""The scale study's table, rows and plot (training/demo/scale_study.py), from given demo results."""
from __future__ import annotations

import json

import pytest

from test_training_common import import_training

import_training()

from flexmoe_training.demo import scale_study  # noqa: E402


def _results(run_dir: str, merged: float, btm: float, moe: float, oracle: float, hidden: int) -> dict:
    owners = ["code", "man"]
    losses = {c: {d: {"loss": v + 0.1 * i} for i, d in enumerate(owners)} for c, v in
              (("merged", merged), ("btm-top2", btm), ("moe", moe), ("oracle", oracle), ("public", 5.0))}
    return {"owner_domains": owners, "public_domain": "web", "losses": losses, "run_dir": run_dir, "total_s": 600.0,
            "flops": {"flexolmo": 1e13}, "claims": [{"id": "merged_beats_btm", "verdict": "refuted"}],
            "settings": {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 3,
                         "train_bytes": 400_000, "public_steps": 300, "expert_steps": 250}}


def test_rows_gaps_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(scale_study, "_public_params", lambda run_dir: {"a": 750_000, "b": 1_500_000}[run_dir])
    rows = [scale_study.study_row("1x", _results("a", 3.6, 2.5, 2.7, 3.5, 128)),
            scale_study.study_row("2x", _results("b", 3.2, 2.4, 2.5, 3.15, 192))]
    assert rows[0]["vs_btm"] == pytest.approx(1.1) and rows[0]["vs_moe"] == pytest.approx(0.9)
    assert rows[1]["vs_oracle"] == pytest.approx(0.05) and rows[1]["owner_avg"]["merged"] == pytest.approx(3.25)
    assert rows[0]["claims"] == {"merged_beats_btm": "refuted"}
    table = scale_study.format_table(rows).splitlines()
    assert len(table) == 4 and table[2].startswith("| 1x | 0.75 M | 128 / 256 / 3 | 400 kB | 300 + 250 |")
    assert len({line.count("|") for line in table}) == 1          # header, separator and rows: same columns
    assert "+1.100" in table[2] and "+0.050" in table[3] and table[2].endswith("10.0 min |")
    png = scale_study.plot_study(rows, str(tmp_path / "s.png"))
    if png is not None:
        assert (tmp_path / "s.png").stat().st_size > 5000


def test_run_study_writes_its_files_and_refuses_unknown_points(tmp_path, monkeypatch):
    monkeypatch.setattr(scale_study, "_public_params", lambda run_dir: 750_000)
    seen = []

    def run(point, over):
        seen.append((point, over))
        from flexmoe_training.demo.pipeline import settings_for

        return _results("a", 3.6, 2.5, 2.7, 3.5, settings_for("default", **over).hidden_size)

    rows = scale_study.run_study(str(tmp_path), ["1x", "2x"], run, log=lambda s: None)
    assert [p for p, _ in seen] == ["1x", "2x"] and seen[1][1] == scale_study.POINTS["2x"] == {}  # 2x = the default
    study = json.loads((tmp_path / "scale_study.json").read_text())
    assert study[0]["hidden_size"] == 128 and study[1]["hidden_size"] == 192 == rows[1]["hidden_size"]
    assert (tmp_path / "scale_study.md").read_text().count("\n") == 4
    with pytest.raises(ValueError, match="unknown scale-study point"):
        scale_study.run_study(str(tmp_path), ["3x"], run)
