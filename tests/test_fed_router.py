"""Federated router tuning (training/demo/fed_router.py): parties exchange only router states and
a validation number per scored round; the coordinator takes one Adam step on the parties' mean
change (FedAdam); the round kept is the owners' choice."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from test_training_common import import_training

pytest.importorskip("deepspeed")
import_training()

from flexmoe_kernels.models import FlexOlmoForCausalLM  # noqa: E402
from test_training import recipe  # noqa: E402,F401  (the module-scoped fixture)


def test_choose_round_is_the_owners_best_within_the_public_tolerance():
    from flexmoe_training.demo.fed_router import choose_round

    val = {"a": [4.0, 3.9, 3.7, 3.8], "b": [3.0, 2.9, 2.8, 2.7], "pub": [5.0, 5.005, 5.2, 5.0]}
    d = choose_round(val, ["a", "b"], "pub", 0.01, 0.0)
    # owner means 3.5, 3.4, 3.25, 3.25: round 2 is out (its public loss rose by 0.2 > 0.01), so round 3
    assert d["round"] == 3 and d["kept"] == "tuned" and d["start_owner_mean"] == 3.5
    assert choose_round({"a": [4.0, 4.1], "pub": [5.0, 4.0]}, ["a"], "pub", 0.01, 0.0)["round"] == 0
    assert choose_round({"a": [4.0, 3.995], "pub": [5.0, 5.0]}, ["a"], "pub", 0.01, 0.01)["round"] == 0  # min_delta


def test_choose_round_maps_scored_rounds_and_rejects_a_bad_list():
    from flexmoe_training.demo.fed_router import choose_round, scored_rounds

    assert scored_rounds(7, 3) == [0, 3, 6, 7] and scored_rounds(4, 1) == [0, 1, 2, 3, 4] and scored_rounds(2, 5) == [0, 2]
    val = {"a": [4.0, 3.5, 3.6], "pub": [5.0, 5.0, 5.0]}
    d = choose_round(val, ["a"], "pub", 0.01, 0.0, [0, 5, 10])
    assert d["round"] == 5 and d["scored_rounds"] == [0, 5, 10]
    with pytest.raises(ValueError, match="rounds"):
        choose_round(val, ["a"], "pub", 0.01, 0.0, [0, 5])
    with pytest.raises(ValueError, match="rounds"):
        choose_round(val, ["a"], "pub", 0.01, 0.0, [1, 5, 10])


def _adam_reference(x0, gs, lr, wd, b1=0.9, b2=0.99, eps=1e-8, bias=False):
    """Adam by the textbook, one tensor, pseudo-gradients ``gs`` in order (decoupled decay on rows)."""
    x, m, v = x0.clone(), torch.zeros_like(x0), torch.zeros_like(x0)
    for t, g in enumerate(gs, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if not bias:
            x = x * (1 - lr * wd)
        x = x - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        if bias:
            x[0] = 0.0
            x = x.clamp(max=0.0)
    return x


def test_server_adam_is_adam_on_the_mean_change():
    """Two rounds of random party routers: the global router is textbook Adam on ``global - mean``,
    with decay on the rows only, the public bias 0 and every bias <= 0."""
    from flexmoe_training.demo.fed_router import ServerAdam

    g = torch.Generator().manual_seed(0)
    start = {"layers.0.weight": torch.randn(4, 6, generator=g), "layers.0.bias": -torch.rand(4, generator=g)}
    start["layers.0.bias"][0] = 0.0
    server = ServerAdam(start, lr=0.05, weight_decay=0.1)
    x, gs = dict(start), {k: [] for k in start}
    for _ in range(2):
        parties = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in x.items()} for _ in range(3)]
        for k in start:
            gs[k].append(x[k] - sum(p[k] for p in parties) / 3)
        x = server.step(parties)
    assert torch.allclose(x["layers.0.weight"], _adam_reference(start["layers.0.weight"], gs["layers.0.weight"],
                                                                0.05, 0.1), atol=1e-6)
    assert torch.allclose(x["layers.0.bias"], _adam_reference(start["layers.0.bias"], gs["layers.0.bias"], 0.05, 0.1,
                                                              bias=True), atol=1e-6)
    assert float(x["layers.0.bias"][0]) == 0.0 and bool((x["layers.0.bias"] <= 0).all())
    assert not torch.equal(x["layers.0.weight"], start["layers.0.weight"])
    with pytest.raises(ValueError, match="lr"):
        ServerAdam(start, lr=0.0)
    with pytest.raises(ValueError, match="party_states"):
        server.step([])


def _run_parties(merged, exchange, parties, rounds, coordinator_start, eval_every=1):
    """Run the parties in threads (their own processes in the demo) and the coordinator here."""
    from flexmoe_training.demo.fed_router import coordinate, main

    rcs = {}

    def party(name, data):
        rcs[name] = main(["--model", str(merged), "--name", name, "--data", str(data), "--exchange", str(exchange),
                          "--rounds", str(rounds), "--local-steps", "2", "--lr", "5e-2", "--seq-len", "32",
                          "--eval-every", str(eval_every),
                          "--batch-size", "4", "--val-windows", "4", "--timeout", "60"])

    threads = [threading.Thread(target=party, args=p) for p in parties]
    for t in threads:
        t.start()
    try:
        res = coordinate(str(exchange), coordinator_start, [n for n, _ in parties], rounds, lambda: None,
                         lr=0.02, weight_decay=0.1, eval_every=eval_every, timeout_s=120, log=lambda s: None)
    finally:
        for t in threads:
            t.join()
    return res, rcs


def test_rounds_step_adam_on_the_parties_routers_and_keep_the_public_bias(recipe, tmp_path):  # noqa: F811
    from flexmoe_training.demo.fed_router import ServerAdam, read_router, router_state

    merged = recipe / "merged"
    start = router_state(FlexOlmoForCausalLM.from_pretrained(str(merged), dtype=torch.float32))
    parties = [("alpha", recipe / "data_a"), ("colors", recipe / "data_b"), ("pub", recipe / "data_pub")]
    res, rcs = _run_parties(merged, tmp_path / "x", parties, 3, start, eval_every=2)
    assert rcs == {"alpha": 0, "colors": 0, "pub": 0}
    assert res["rounds"] == [0, 2, 3] and all(len(v) == 3 for v in res["val"].values())   # rounds 0, 2, 3 scored
    assert not (tmp_path / "x" / "alpha-1.json").exists()
    replay = ServerAdam(start, lr=0.02, weight_decay=0.1)             # global-(r+1) = Adam step on round r's routers
    for r in range(3):
        states = [read_router(str(tmp_path / "x" / f"{n}-{r}.safetensors")) for n, _ in parties]
        for s in states:                                               # each party started from global-r
            assert any(not torch.equal(s[k], res["globals"][r][k]) for k in s), "a party did not train"
        nxt = replay.step(states)
        for k, v in res["globals"][r + 1].items():
            assert torch.allclose(v, nxt[k], atol=1e-6), k
            if k.endswith(".bias"):
                assert float(v[0]) == 0.0 and bool((v <= 0).all())    # public bias stays 0; min(b, 0) kept
    assert any(not torch.equal(res["globals"][3][k], start[k]) for k in start)
    assert json.loads((tmp_path / "x" / "alpha-0.json").read_text())["val_loss"] == res["val"]["alpha"][0]


def test_a_stopped_coordinator_stops_the_parties(recipe, tmp_path):  # noqa: F811
    """The coordinator writes ABORT when it stops; a party waiting for the next round exits with 2
    instead of waiting out its timeout."""
    from flexmoe_training.demo.fed_router import main

    ex = tmp_path / "x"
    ex.mkdir()
    (ex / "ABORT").write_text("stopped")
    rc = main(["--model", str(recipe / "merged"), "--name", "alpha", "--data", str(recipe / "data_a"),
               "--exchange", str(ex), "--rounds", "1", "--seq-len", "32", "--val-windows", "2", "--timeout", "60"])
    assert rc == 2


@pytest.mark.parametrize("flags", [["--lr", "0"], ["--lr", "nan"], ["--eval-every", "0"]])
def test_bad_party_flags_are_errors_naming_the_flag(tmp_path, capsys, flags):
    from flexmoe_training.demo.fed_router import main

    rc = main(["--model", str(tmp_path / "m"), "--name", "a", "--data", str(tmp_path / "d"), "--exchange",
               str(tmp_path / "x"), *flags])
    assert rc == 2 and flags[0] in capsys.readouterr().err
