"""Faithful defaults: the authors' shared client start, the paper's headline figure, the reproduce command."""
import dataclasses
import json

import pytest
import torch

from hyperfl_fast.config import Config, ConfigError
from hyperfl_fast.engines import build_batched, build_reference
from hyperfl_fast.models import cnn_spec
from hyperfl_fast.reproduce import main as reproduce_main
from hyperfl_fast.reproduce import reproduce
from hyperfl_fast.runner import run

from conftest import small_federation


def initial_private_state(engine, num_clients):
    """Every client's private tensors (HyperFL: embedding, classifier weight and bias; local: its CNN)."""
    return [tuple(engine.client_state(i).values()) for i in range(num_clients)]


@pytest.mark.parametrize("method", ["hyperfl", "local", "pfedhn-pc"])
@pytest.mark.parametrize("build", [build_reference, build_batched])
@pytest.mark.parametrize("client_init", ["shared", "independent"])
def test_client_init(method, build, client_init):
    _, clients = small_federation(clients=4)
    cfg = Config(dataset="synthetic", method=method, clients=4, client_init=client_init, device="cpu")
    states = initial_private_state(build(cnn_spec(1, 10), clients, cfg, torch.device("cpu")), 4)
    assert len(states) == 4
    same = [all(torch.equal(a, b) for a, b in zip(states[0], other)) for other in states[1:]]
    assert all(same) if client_init == "shared" else not any(same)


@pytest.mark.parametrize("client_init", ["shared", "independent"])
def test_engines_start_from_the_same_draw(client_init):
    _, clients = small_federation(clients=3)
    cfg = Config(dataset="synthetic", clients=3, client_init=client_init, device="cpu")
    ref, batched = (initial_private_state(build(cnn_spec(1, 10), clients, cfg, torch.device("cpu")), 3)
                    for build in (build_reference, build_batched))
    for r, b in zip(ref, batched):
        for x, y in zip(r, b):
            assert torch.equal(x, y)


def test_shared_clients_own_separate_copies(tiny_config, tmp_path):
    """Clients start equal but are not aliases: training one leaves the others' private state alone."""
    _, clients = small_federation(clients=4)
    cfg = dataclasses.replace(tiny_config, client_init="shared")
    engine = build_reference(cnn_spec(1, 10), clients, cfg, torch.device("cpu"))
    engine.run_round(0, [0])
    states = initial_private_state(engine, 4)
    assert not torch.equal(states[0][0], states[1][0]) and torch.equal(states[1][0], states[2][0])


def test_bad_client_init_is_refused():
    with pytest.raises(ConfigError, match="--client-init: unknown choice 'copied'"):
        Config(client_init="copied").validate()


@pytest.mark.parametrize("method,headline", [("hyperfl", "local_acc"), ("fedavg", "global_acc"),
                                             ("local", "local_acc")])
def test_headline_is_the_papers_figure(method, headline, tiny_config, tmp_path):
    result = run(dataclasses.replace(tiny_config, method=method, rounds=1, output_dir=str(tmp_path)),
                 log=lambda _: None)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["headline"]["metric"] == headline
    for r in metrics["rounds"]:
        assert r["headline_acc"] == r[headline] and "local_acc" in r and "global_acc" in r
    assert result.final["headline_acc"] == result.final[headline]
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert header == "round,train_loss,local_acc,global_acc,headline_acc,seconds"


def test_reproduce_writes_table_plots_json_and_skips_finished_runs(tiny_config, tmp_path):
    base = dataclasses.replace(tiny_config, rounds=2, data_dir=str(tmp_path / "nothing-here"))
    lines = []
    results = reproduce(base, ["hyperfl", "fedavg"], ["synthetic", "emnist"], [0, 1], tmp_path / "out",
                        log=lines.append)
    assert results["missing_datasets"] == ["emnist"]
    assert any("skipped" in line and "emnist" in line for line in lines)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| synthetic | 4 | hyperfl | mean local accuracy |" in table
    assert "| synthetic | 4 | fedavg | global-model accuracy |" in table
    png = (tmp_path / "out" / "accuracy_synthetic_4clients.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {(r["method"], tuple(r["seeds"])) for r in saved["rows"]} == {("hyperfl", (0, 1)), ("fedavg", (0, 1))}
    assert all(len(r["headline"]) == 2 for r in saved["runs"])
    hyperfl = next(r for r in saved["rows"] if r["method"] == "hyperfl")
    finals = [r["headline"][-1] for r in saved["runs"] if r["method"] == "hyperfl"]
    assert hyperfl["mean"] == pytest.approx(sum(finals) / 2)
    assert hyperfl["paper"] is None and hyperfl["difference"] is None

    # a second invocation reads every finished run back and trains nothing
    metrics = tmp_path / "out" / "runs" / "synthetic-4clients-hyperfl-seed0" / "metrics.json"
    before = metrics.stat().st_mtime_ns
    lines.clear()
    again = reproduce(base, ["hyperfl", "fedavg"], ["synthetic"], [0, 1], tmp_path / "out", log=lines.append)
    assert sum("finished earlier" in line for line in lines) == 4 and not any(": training" in l for l in lines)
    assert metrics.stat().st_mtime_ns == before
    assert again["rows"] == results["rows"]

    # asking for fewer rounds reuses the prefix of the finished runs; more rounds continue them
    assert reproduce(dataclasses.replace(base, rounds=1), ["hyperfl"], ["synthetic"], [0], tmp_path / "out",
                     log=lines.append)["runs"][0]["headline"] == saved["runs"][0]["headline"][:1]
    lines.clear()
    longer = reproduce(dataclasses.replace(base, rounds=3), ["hyperfl"], ["synthetic"], [0], tmp_path / "out",
                       log=lines.append)
    assert any("resumed from" in line and "after round 2" in line for line in lines)
    assert longer["runs"][0]["headline"][:2] == saved["runs"][0]["headline"]


def test_reproduce_paper_column_for_fmnist(tmp_path):
    from hyperfl_fast.methods import METHODS, get_method
    from hyperfl_fast.reproduce import markdown_table, table_rows, RunCurve

    curves = [RunCurve("fmnist", "hyperfl", s, [80.0, acc], 10.0) for s, acc in enumerate([88.0, 89.0])]
    curves.append(RunCurve("fmnist", "pfedhn", 0, [85.0, 86.0, 87.0], 3.0, clients=100, frac=0.3))
    rows = table_rows(curves)
    assert rows[0]["paper"] == get_method("hyperfl").paper["fmnist"][20] == 88.28
    assert rows[0]["difference"] == pytest.approx(88.5 - 88.28)
    table = markdown_table(rows, "")
    assert "| fmnist | 20 | hyperfl | mean local accuracy | 88.50 ± 0.71 | 2 | 88.28 | +0.22 | 10.0 | 5.00 |" in table
    assert "| fmnist | 100 | pfedhn | global-model accuracy | 87.00 ± 0.00 | 1 | 89.80 | -2.80 | 3.0 | 1.00 |" in table
    # the paper's whole Table 1, every figure, ours beside the two we ran; and its Table 4 beside ours
    table1 = table[table.index("## Table 1"):table.index("## Table 4")]
    figures = [f"{v:.2f}" for m in METHODS.values() for by_clients in m.paper.values() for v in by_clients.values()]
    assert len(figures) == 7 * 8 and all(f in table1 for f in figures)
    assert "88.50 / 88.28 (+0.22)" in table1 and "87.00 / 89.80 (-2.80)" in table1
    assert "| hyperfl | 37 | 5.00 (fmnist, 20) |" in table


@pytest.mark.parametrize("flags,message", [(["--methods", "fedprox"], "--methods: unknown fedprox"),
                                           (["--datasets", "mnist"], "--datasets: unknown mnist"),
                                           (["--seeds", "0"], "--seeds must be positive"),
                                           (["--client-init", "x"], "--client-init")])
def test_reproduce_bad_flags(flags, message, tmp_path, capsys):
    assert reproduce_main(flags + ["--output-dir", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
