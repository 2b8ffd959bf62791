"""Federated router tuning (training/demo/fed_router.py): parties exchange only router states and
one validation number per round; the coordinator averages; the round kept is the owners' choice."""
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


def _run_parties(merged, exchange, parties, rounds, coordinator_start):
    """Run the parties in threads (their own processes in the demo) and the coordinator here."""
    from flexmoe_training.demo.fed_router import coordinate, main

    rcs = {}

    def party(name, data):
        rcs[name] = main(["--model", str(merged), "--name", name, "--data", str(data), "--exchange", str(exchange),
                          "--rounds", str(rounds), "--local-steps", "2", "--lr", "5e-2", "--seq-len", "32",
                          "--batch-size", "4", "--val-windows", "4", "--timeout", "60"])

    threads = [threading.Thread(target=party, args=p) for p in parties]
    for t in threads:
        t.start()
    try:
        res = coordinate(str(exchange), coordinator_start, [n for n, _ in parties], rounds, lambda: None,
                         timeout_s=120, log=lambda s: None)
    finally:
        for t in threads:
            t.join()
    return res, rcs


def test_rounds_average_the_parties_routers_and_keep_the_public_bias(recipe, tmp_path):  # noqa: F811
    from flexmoe_training.demo.fed_router import read_router, router_state

    merged = recipe / "merged"
    start = router_state(FlexOlmoForCausalLM.from_pretrained(str(merged), dtype=torch.float32))
    parties = [("alpha", recipe / "data_a"), ("colors", recipe / "data_b"), ("pub", recipe / "data_pub")]
    res, rcs = _run_parties(merged, tmp_path / "x", parties, 2, start)
    assert rcs == {"alpha": 0, "colors": 0, "pub": 0}
    assert all(len(v) == 3 for v in res["val"].values())              # rounds 0..2 scored
    for r in range(2):                                                 # global-(r+1) = mean of round r's routers
        states = [read_router(str(tmp_path / "x" / f"{n}-{r}.safetensors")) for n, _ in parties]
        for k, v in res["globals"][r + 1].items():
            assert torch.allclose(v, sum(s[k] for s in states) / 3, atol=1e-6), k
            if k.endswith(".bias"):
                assert float(v[0]) == 0.0 and bool((v <= 0).all())    # public bias stays 0; min(b, 0) kept
    moved = any(not torch.equal(res["globals"][2][k], start[k]) for k in start)
    assert moved
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
