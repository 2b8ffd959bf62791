"""Resume refuses what it cannot continue exactly (issue 21): another run's inputs (items 7), a
damaged saved state (item 10); and the saved RNG is restored (item 17c). CPU, one process, tiny
models (the fixtures of ``test_training_common``)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from test_training_common import (data_and_model_config, fast_flags, import_training, pause_args, run_cli,
                                  seeded_rng, write_corpus)

pytest.importorskip("deepspeed")
import_training()


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """``root/data`` and ``root/data_b`` (two prepared corpora of the same tokenizer),
    ``root/model.json``, a public model ``root/pub_a`` (1 step) and ``root/pub_b``: the same
    shapes, one tensor changed."""
    from safetensors.torch import load_file, save_file

    root = data_and_model_config(tmp_path_factory.mktemp("inputs"), 12)
    _, rng = seeded_rng()
    write_corpus(root / "text_b", 12, rng)
    assert run_cli(["prepare-data", "--input", root / "text_b", "--out", root / "data_b", "--no-progress"]) == 0
    assert run_cli(["train-public", "--data", root / "data", "--out", root / "pub_a", "--model-config",
                    root / "model.json", "--steps", "1", *fast_flags(eval_batches=1)]) == 0
    shutil.copytree(root / "pub_a", root / "pub_b")
    sd = load_file(str(root / "pub_b" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0] += 0.5
    save_file(sd, str(root / "pub_b" / "model.safetensors"), metadata={"format": "pt"})
    return root


def _refused(capsys, args, *needles) -> str:
    """Run ``args``: exit status 2 and one line on stderr holding every needle; returns it."""
    assert run_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    for n in needles:
        assert str(n) in err, (n, err)
    return err


def _swap(args: list, flag: str, value) -> list:
    i = args.index(flag)
    return args[:i + 1] + [value] + args[i + 2:]


# ============================================================================ item 7: another run's inputs
def test_resume_refuses_other_data(two_inputs, tmp_path, capsys):
    """train-public paused on --data A does not continue on --data B, nor on A's directory
    re-prepared from other text (same path, other content)."""
    root = two_inputs
    shutil.copytree(root / "data", tmp_path / "data_a")
    args = _swap(pause_args(root, 0), "--data", tmp_path / "data_a") + ["--out", tmp_path / "part"]
    assert run_cli(args + ["--max-steps-this-run", "1"]) == 0
    capsys.readouterr()
    _refused(capsys, _swap(args, "--data", root / "data_b"), "--data", tmp_path / "data_a", root / "data_b",
             "--restart")
    shutil.rmtree(tmp_path / "data_a")
    shutil.copytree(root / "data_b", tmp_path / "data_a")
    _refused(capsys, args, "--data", tmp_path / "data_a", "--restart")
    # the partial run is kept (refusing discards nothing); --restart starts over on the new data
    assert (tmp_path / "part.inprogress" / "state").is_dir()
    assert run_cli(args + ["--restart"]) == 0
    assert json.loads((tmp_path / "part" / "run.json").read_text())["resumed_from_step"] is None


def test_resume_refuses_other_public_and_name(two_inputs, tmp_path, capsys):
    """train-expert paused on --public A (--name x) does not continue on a public model B of
    the same shapes, nor under another --name or --router-init."""
    from safetensors.torch import save_file

    root = two_inputs
    for i in (1, 2):  # two router inits of the right width
        save_file({"router_embedding": torch.randn(32)}, str(tmp_path / f"r{i}.safetensors"))
    args = ["train-expert", "--public", root / "pub_a", "--data", root / "data", "--name", "x", "--steps", "3",
            "--router-init", tmp_path / "r1.safetensors", "--out", tmp_path / "part", *fast_flags(eval_batches=1)]
    assert run_cli(args + ["--max-steps-this-run", "1"]) == 0
    capsys.readouterr()
    _refused(capsys, _swap(args, "--public", root / "pub_b"), "--public", root / "pub_a", root / "pub_b",
             "--restart")
    _refused(capsys, _swap(args, "--name", "y"), "--name", "'x'", "'y'", "--restart")
    _refused(capsys, _swap(args, "--router-init", tmp_path / "r2.safetensors"), "--router-init",
             tmp_path / "r1.safetensors", tmp_path / "r2.safetensors", "--restart")
    assert run_cli(args) == 0  # the same inputs resume
    run = json.loads((tmp_path / "part" / "run.json").read_text())
    assert run["resumed_from_step"] == 1 and run["expert_name"] == "x"


# ============================================================================ item 10: a damaged state
def _truncate(p: Path) -> None:
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size // 2)


def _garble_tail(p: Path) -> None:
    """Same size, the last 512 bytes (the zip directory of a torch file) zeroed."""
    with open(p, "r+b") as f:
        f.seek(-512, 2)
        f.write(b"\0" * 512)


DAMAGE = {  # zero stage -> [(what, file name pattern, damage)]
    0: [("deleted", "mp_rank_00_model_states.pt", Path.unlink),
        ("truncated", "mp_rank_00_model_states.pt", _truncate),
        ("garbled", "mp_rank_00_model_states.pt", _garble_tail),
        ("deleted", "rng.safetensors", Path.unlink),
        ("deleted", "trainer_state.json", Path.unlink)],
    2: [("deleted", "mp_rank_00_model_states.pt", Path.unlink),
        ("truncated", "*optim_states.pt", _truncate),
        ("deleted", "zero_pp_rank_0_*", Path.unlink),
        ("garbled", "*optim_states.pt", _garble_tail)],
}


@pytest.mark.parametrize("zero", sorted(DAMAGE))
def test_resume_damaged_state_names_file_and_restart(two_inputs, tmp_path, capsys, zero):
    """A paused state with a file deleted, truncated or garbled (same size): resuming fails with
    one line naming the file and --restart, keeps the partial run; --restart then starts over."""
    args = pause_args(two_inputs, zero)
    assert run_cli(args + ["--out", tmp_path / "part", "--max-steps-this-run", "1"]) == 0
    capsys.readouterr()
    for i, (what, pattern, damage) in enumerate(DAMAGE[zero]):
        out = tmp_path / f"dmg{i}"
        shutil.copytree(tmp_path / "part.inprogress", tmp_path / f"dmg{i}.inprogress")
        victim, = (tmp_path / f"dmg{i}.inprogress" / "state").glob(pattern)
        damage(victim)
        _refused(capsys, args + ["--out", out], victim.name, "--restart")
        assert (tmp_path / f"dmg{i}.inprogress" / "state").is_dir() and not out.exists(), what
    assert run_cli(args + ["--out", out, "--restart"]) == 0
    assert json.loads((out / "run.json").read_text())["resumed_from_step"] is None


def test_engine_load_failure_is_one_line_naming_restart(tmp_path):
    """Damage the size and zip checks cannot see fails inside DeepSpeed's load: one line naming
    the file (or the state) and --restart."""
    from flexmoe_training.options import TrainingError
    from flexmoe_training.resume import load_engine_state

    class Engine:
        def __init__(self, exc):
            self.exc = exc

        def load_checkpoint(self, *a, **kw):
            raise self.exc

    bad = tmp_path / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    for exc, name in ((RuntimeError("PytorchStreamReader failed reading file data/0:\ninvalid header"), "state"),
                      (FileNotFoundError(2, "No such file or directory", str(bad)), bad.name)):
        with pytest.raises(TrainingError) as info:
            load_engine_state(Engine(exc), tmp_path, {"rng": torch.get_rng_state()})
        msg = str(info.value)
        assert "\n" not in msg and name in msg and "--restart" in msg and type(exc).__name__ in msg, msg


# ============================================================================ item 17c: the RNG is restored
def _record_draws(monkeypatch) -> list:
    """Each optimizer step first draws from torch's global RNG (as dropout would) and records it."""
    from flexmoe_training import trainer

    draws, real = [], trainer._train_step

    def step(r, s, *a, **kw):
        draws.append((s, torch.rand(4)))
        return real(r, s, *a, **kw)

    monkeypatch.setattr(trainer, "_train_step", step)
    return draws


def test_resume_restores_the_rng(two_inputs, tmp_path, monkeypatch):
    """A run's random draws are its own (seeded by --seed, not by whatever ran before in the
    process) and a paused run's resumed draws continue the saved RNG: step for step those of the
    uninterrupted run."""
    draws = _record_draws(monkeypatch)
    args = pause_args(two_inputs, 0)
    assert run_cli(args + ["--out", tmp_path / "full"]) == 0
    straight = dict(draws)
    draws.clear()
    torch.rand(7)  # another state before the second run
    assert run_cli(args + ["--out", tmp_path / "part", "--max-steps-this-run", "2"]) == 0
    torch.manual_seed(12345)  # and before the resume
    assert run_cli(args + ["--out", tmp_path / "part"]) == 0
    resumed = dict(draws)
    assert sorted(resumed) == sorted(straight) == [0, 1, 2, 3]
    for s in straight:
        torch.testing.assert_close(resumed[s], straight[s], atol=0, rtol=0, msg=f"step {s}")


def test_cuda_rng_saved_and_restored(tmp_path, monkeypatch):
    """On GPU the main rank's CUDA generator is saved next to the CPU one and restored on resume
    (torch.cuda faked here: the CPU machines run this test too)."""
    from flexmoe_training import resume

    fake = {"state": torch.arange(16, dtype=torch.uint8), "set": []}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake["state"].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": fake["set"].append((s.clone(), device)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    partial, st_dir = tmp_path / "state.partial", tmp_path / "state"
    partial.mkdir()
    cpu = torch.get_rng_state()
    resume._finish_partial(partial, st_dir, {"format": resume.STATE_FORMAT, "step": 1}, torch.device("cuda", 0))
    state = resume._read_state(st_dir)
    assert torch.equal(state["rng"], cpu) and torch.equal(state["cuda_rng"], fake["state"])

    class Engine:
        def load_checkpoint(self, *a, **kw):
            return str(st_dir), {}

    torch.rand(3)
    resume.load_engine_state(Engine(), tmp_path, state)
    assert torch.equal(torch.get_rng_state(), cpu)
    (s, dev), = fake["set"]
    assert torch.equal(s, fake["state"]) and dev == 0
