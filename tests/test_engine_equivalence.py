"""The batched lockstep engine equals the per-client reference engine.

Both engines draw every random number from the same keyed generators (see
hyperfl_fast/federation.py), so given the same seed and data they must agree.
The comparison runs in float64: HyperFL's first steps have logits in the
thousands and active gradient clipping, where float32 rounding differences
(one GEMM over all clients vs per-client calls) grow to visible size; in
float64 the engines agree to ~1e-12, which is the proof that the fast engine
computes HyperFL itself (factored heads included) and not something near it.
"""

import pytest
import torch

from hyperfl_fast.lockstep.optim import StackedSGD
from hyperfl_fast.config import Config
from hyperfl_fast.engines import build_batched, build_reference
from hyperfl_fast.federation import sample_clients
from hyperfl_fast.models import cnn_spec

from conftest import DEVICE, NEEDS_OPACUS, small_federation, tiny_model


def federation(in_channels, sizes):
    """Synthetic clients in float64, client i keeping the first sizes[i] training samples."""
    _, clients = small_federation(in_channels, clients=len(sizes), local_size=max(sizes))
    for client, size in zip(clients, sizes):
        client.train_x, client.train_y = client.train_x[:size].double(), client.train_y[:size]
        client.test_x = client.test_x.double()
    return clients


def run_both(cfg, clients, rounds, device=torch.device("cpu")):
    spec = cnn_spec(clients[0].train_x.shape[1], 10)
    engines = [build(spec, clients, cfg, device) for build in (build_reference, build_batched)]
    history = []
    for r in range(rounds):
        sampled = sample_clients(len(clients), cfg.frac, cfg.seed, r)
        history.append([engine.run_round(r, sampled) for engine in engines])
    return engines, history


def assert_same_states(ref, batched, num_clients):
    """The server's state and every client's private state agree between the engines."""
    states = [(ref.global_state(), batched.global_state())]
    states += [(ref.client_state(c), batched.client_state(c)) for c in range(num_clients)]
    for want, got in states:
        assert set(got) == set(want)
        for name, tensor in want.items():
            torch.testing.assert_close(got[name], tensor, rtol=1e-9, atol=1e-12)


def assert_same_results(history):
    for ref_results, batched_results in history:
        assert [r.client for r in ref_results] == [b.client for b in batched_results]
        for r, b in zip(ref_results, batched_results):
            assert b.train_loss == pytest.approx(r.train_loss, rel=1e-9, abs=1e-9)
            assert b.local_acc == pytest.approx(r.local_acc, abs=1e-9)
            assert b.global_acc == pytest.approx(r.global_acc, abs=1e-9)


@pytest.mark.parametrize("method,client_init", [("hyperfl", "shared"), ("hyperfl", "independent"),
                                                ("fedavg", "shared"), ("local", "shared"), ("local", "independent"),
                                                ("pfedhn", "shared"), ("pfedhn-pc", "independent")])
def test_batched_engine_equals_reference(method, client_init, float64):
    # unequal client sizes (partial and missing batches) and partial participation
    cfg = Config(dataset="synthetic", method=method, clients=4, frac=0.75, local_epochs=2, batch_size=20,
                 device="cpu", seed=3, client_init=client_init)
    (ref, batched), history = run_both(cfg, federation(1, [60, 47, 33, 60]), rounds=3)
    assert_same_results(history)
    assert_same_states(ref, batched, 4)


def test_batched_engine_equals_reference_with_augmentation(float64):
    cfg = Config(dataset="synthetic-rgb", clients=3, local_epochs=1, batch_size=25, device="cpu")
    (ref, batched), history = run_both(cfg, federation(3, [50, 50, 40]), rounds=2)
    assert_same_results(history)
    assert_same_states(ref, batched, 3)


def test_stacked_sgd_equals_torch_sgd_per_client():
    """StackedSGD on (N, ...) tensors = one torch.optim.SGD per client; inactive clients stay untouched."""
    torch.manual_seed(1)
    n, lr, momentum, wd = 3, 0.1, 0.5, 5e-4
    params = [torch.randn(n, 4, 3, dtype=torch.float64), torch.randn(n, 5, dtype=torch.float64)]
    stacked = StackedSGD([p.clone() for p in params], lr, momentum, wd)
    per_client = [[p[i].clone().requires_grad_() for p in params] for i in range(n)]
    optimizers = [torch.optim.SGD(ps, lr=lr, momentum=momentum, weight_decay=wd) for ps in per_client]
    for step in range(4):
        active = torch.tensor([True, step != 1, step >= 2])
        grads = [torch.randn_like(p) for p in params]
        stacked.step(grads, active)
        for i in range(n):
            if active[i]:
                for p, g in zip(per_client[i], grads):
                    p.grad = g[i].clone()
                optimizers[i].step()
    for k in range(len(params)):
        expected = torch.stack([per_client[i][k].detach() for i in range(n)])
        torch.testing.assert_close(stacked.params[k], expected, rtol=1e-12, atol=1e-12)
    assert not torch.equal(stacked.params[0], params[0])


def test_cli_runs_both_engines(tmp_path, capsys):
    from hyperfl_fast.train import main

    flags = ["--dataset", "synthetic", "--clients", "3", "--local-size", "40", "--test-size", "20",
             "--local-epochs", "1", "--batch-size", "20", "--rounds", "1", "--device", "cpu"]
    assert main(flags + ["--output-dir", str(tmp_path / "b")]) == 0
    assert "engine batched, device cpu; ops: torch (CPU); precision fp32" in capsys.readouterr().out
    assert main(flags + ["--engine", "reference", "--output-dir", str(tmp_path / "r")]) == 0
    assert "engine reference" in capsys.readouterr().out
    assert main(flags + ["--engine", "fast", "--output-dir", str(tmp_path / "x")]) == 2
    assert "unknown engine 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize("in_channels", [1, 3], ids=["fmnist-model", "cifar-model"])
def test_batched_engine_on_triton_ops_matches_torch_ops(in_channels, monkeypatch):
    """A whole round on the Triton kernels (interpreted on the CPU: a tiny model) equals the torch path."""
    spec, clients = tiny_model(in_channels, clients=3, local_size=5, test_size=4, device=DEVICE)
    cfg = Config(dataset="synthetic", clients=3, local_epochs=1, batch_size=3, device=DEVICE.type, embed_dim=8,
                 hidden_dim=16)
    results = {}
    for path in ("torch", "triton"):
        monkeypatch.setenv("HYPERFL_OPS_PATH", path)
        engine = build_batched(spec, clients, cfg, DEVICE)
        results[path] = (engine.run_round(0, [0, 2]), engine.run_round(1, [0, 1, 2]), engine.global_state(),
                         engine.client_state(2))
    for got, want in zip(results["triton"], results["torch"]):
        if isinstance(want, dict):
            for name, tensor in want.items():
                torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5)
            continue
        for a, b in zip(want, got):
            assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4)
            assert b.local_acc == a.local_acc and b.global_acc == a.global_acc


@pytest.mark.parametrize("method,first,second", [
    ("hyperfl", "reference", "batched"), ("hyperfl", "batched", "reference"), ("fedavg", "batched", "reference"),
    ("local", "reference", "batched"), pytest.param("dp-fedavg", "reference", "batched", marks=NEEDS_OPACUS),
    pytest.param("centaur", "batched", "reference", marks=NEEDS_OPACUS), ("pfedhn-pc", "batched", "reference")])
def test_a_run_continues_on_the_other_engine(method, first, second, float64):
    """Every engine saves the same state: round 1 on one engine, round 2 on the other, equals round 2 on the
    first (to 1e-9 in float64), whichever way round; the state survives the trip exactly."""
    cfg = Config(dataset="synthetic", method=method, clients=3, local_epochs=1, batch_size=20, device="cpu", seed=1,
                 dp_noise="keyed")  # (DP: the same noise in both engines)
    clients = federation(1, [40, 33, 40])
    spec = cnn_spec(1, 10)
    build = {"reference": build_reference, "batched": build_batched}
    straight = build[first](spec, clients, cfg, torch.device("cpu"))
    straight.run_round(0, [0, 1, 2])
    saved = straight.state_dict()
    assert saved["format"] == "hyperfl_fast/engine-state/1" and saved["method"] == method
    other = build[second](spec, clients, cfg, torch.device("cpu"))
    other.load_state_dict(saved)
    for key in ("global", "clients"):  # nothing lost or changed on the way
        torch.testing.assert_close(other.state_dict()[key], saved[key], rtol=0, atol=0)
    want, got = straight.run_round(1, [0, 2]), other.run_round(1, [0, 2])
    assert_same_results([(want, got)])
    assert_same_states(straight, other, 3)


def test_a_state_that_does_not_fit_is_refused_before_anything_is_loaded(float64):
    cfg = Config(dataset="synthetic", method="hyperfl", clients=3, local_epochs=1, batch_size=20, device="cpu")
    clients = federation(1, [40, 33, 40])
    engine = build_batched(cnn_spec(1, 10), clients, cfg, torch.device("cpu"))
    saved = engine.state_dict()
    before = engine.state_dict()["global"]["fc.weight"].clone()
    bad = {**saved, "global": {**saved["global"], "fc.weight": torch.zeros(3, 3)}}
    with pytest.raises(ValueError, match=r"the server's state: fc.weight is \(3, 3\), this run's \(128, 64\)"):
        engine.load_state_dict(bad)
    with pytest.raises(ValueError, match="it holds a fedavg run, not hyperfl"):
        engine.load_state_dict({**saved, "method": "fedavg"})
    with pytest.raises(ValueError, match="older, engine-specific layout"):
        engine.load_state_dict({"hypernet": saved["global"]})
    with pytest.raises(ValueError, match="it holds 2 clients' states, this run has 3"):
        engine.load_state_dict({**saved, "clients": saved["clients"][:2]})
    assert torch.equal(engine.state_dict()["global"]["fc.weight"], before)


def test_the_cli_resumes_a_run_on_the_other_engine(tmp_path, capsys):
    from hyperfl_fast.train import main

    flags = ["--dataset", "synthetic", "--clients", "3", "--local-size", "30", "--test-size", "20",
             "--local-epochs", "1", "--batch-size", "15", "--device", "cpu", "--output-dir", str(tmp_path)]
    assert main(flags + ["--rounds", "1", "--engine", "reference"]) == 0
    assert main(flags + ["--rounds", "2", "--engine", "batched", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "engine batched" in out and "round    2/2" in out
