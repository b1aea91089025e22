"""Seconds per Flower round on a loopback deployment (a SuperLink and three SuperNodes as processes on this
machine), the tiny synthetic setting of tests/test_flower.py, 4 rounds, three ways side by side:

- ``default``: clients send only their uploads and data sizes (no figures, so no evaluation);
- ``figures``: ``client-metrics=true``, evaluation folded into the next train message (the last round has
  its own evaluate message);
- ``figures-unfolded``: ``client-metrics=true fold-evaluation=false``, every round a train and an evaluate
  message (the app's behaviour before fold-evaluation);
- ``secure``: ``secure-aggregation=true``, the default's figures with Flower's SecAgg+: four message exchanges
  per round (setup, share keys, collect masked vectors, unmask) instead of one.

The server's per-round seconds (metrics.json) are the figure: the median over rounds 2-4 (round 1 includes the
ServerApp's start), and the whole run's wall clock.  Flower starts a ClientApp process per message and polls
every 3 s on the SuperNode and on the ServerApp, so most of a round is Flower's, not this package's.
``test_flower_simulation_fmnist_20_clients``: the Simulation Engine at the paper's scale.
    pytest benchmarks/test_flower_bench.py --benchmark-only -s
"""
import json
import statistics
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_flower import deployment, flwr_run, run_config, stop  # noqa: E402  (the tests' loopback deployment)

CASES = {"default": {"client_metrics": False}, "figures": {"client_metrics": True},
         "figures-unfolded": {"client_metrics": True, "fold_evaluation": False},
         "secure": {"client_metrics": False, "secure_aggregation": True}}


def timed_run(benchmark, tmp_path: Path, out: Path, config: str, simulation: bool = False,
              federation_config: str | None = None) -> list[float]:
    """One `flwr run` with ``config`` (its output-dir ``out``) on a fresh loopback deployment, timed once: the
    server's seconds per round (also in the benchmark's extra info, with the wall clock)."""

    def run():
        start = time.perf_counter()
        with deployment(tmp_path, simulation=simulation) as (env, _, _):
            process = flwr_run(env, config, federation_config)
            try:
                log, _ = process.communicate(timeout=1200)
            finally:
                stop(process)
        assert (out / "metrics.json").exists(), log[-3000:]
        return time.perf_counter() - start

    wall = benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = [r["seconds"] for r in json.loads((out / "metrics.json").read_text())["rounds"]]
    benchmark.extra_info.update({"round_seconds": [round(s, 2) for s in seconds], "wall_s": round(wall, 1)})
    print(f"\nrounds {[round(s, 1) for s in seconds]} s, wall {wall:.1f} s")
    return seconds


def test_flower_simulation_fmnist_20_clients(benchmark, tmp_path):
    """Flower's Simulation Engine: 20 virtual SuperNodes in Ray on this machine, the paper's Fashion-MNIST
    setting (HyperFL, 20 clients, 5 local epochs), 3 rounds; compare with the in-process engines' round
    (benchmarks/test_round_bench.py).  Needs data/fashion-mnist (make data)."""
    data = Path(__file__).resolve().parents[1] / "data"
    if not (data / "fashion-mnist" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not in data/fashion-mnist (make data)")
    out = tmp_path / "out"
    timed_run(benchmark, tmp_path, out, f'dataset="fmnist" data-dir="{data}" clients=20 rounds=3 output-dir="{out}" '
                                        'device="cpu" client-metrics=true',
              simulation=True, federation_config="num-supernodes=20")


@pytest.mark.parametrize("case", list(CASES))
def test_flower_round(benchmark, case, tmp_path):
    out = tmp_path / "out"
    seconds = timed_run(benchmark, tmp_path, out, run_config(out, rounds=4, audit_uploads=False, **CASES[case]))
    benchmark.extra_info["median_round_s_2_to_4"] = round(statistics.median(seconds[1:]), 2)
