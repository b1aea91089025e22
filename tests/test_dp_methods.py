"""DP baselines (DP-FedAvg, PPSGD, CENTAUR): both engines compute the same DP-SGD run, the accountant's
epsilon is reported, the uploads hold exactly what each method shares, and they learn at a loose budget."""
import dataclasses
import json

import pytest
import torch
from opacus.accountants import RDPAccountant

from hyperfl_fast.config import Config
from hyperfl_fast.dp import ALPHAS
from hyperfl_fast.engines import build_batched, build_reference
from hyperfl_fast.federation import sample_clients
from hyperfl_fast.models import cnn_spec
from hyperfl_fast.runner import run

from conftest import small_federation
from test_engine_equivalence import assert_same_states


@pytest.mark.parametrize("method,poisson", [("dp-fedavg", False), ("ppsgd", False), ("centaur", False),
                                            ("dp-fedavg", True), ("centaur", True)])  # centaur: shuffled + Poisson
def test_batched_dp_methods_equal_the_reference_loop(method, poisson, float64):
    """Per-sample backward passes (reference) vs ghost-clipped sums (batched), the same keyed noise."""
    _, clients = small_federation(clients=3, local_size=24)
    for client, size in zip(clients, [24, 17, 24]):  # a short client: partial and missing batches
        client.train_x, client.train_y = client.train_x[:size].double(), client.train_y[:size]
        client.test_x = client.test_x.double()
    cfg = Config(dataset="synthetic", method=method, clients=3, frac=0.67, local_epochs=1, batch_size=10,
                 rounds=2, epsilon=8.0, device="cpu", seed=1, poisson=poisson, dp_noise="keyed")
    engines = [build(cnn_spec(1, 10), clients, cfg, torch.device("cpu")) for build in (build_reference,
                                                                                          build_batched)]
    for r in range(2):
        sampled = sample_clients(3, cfg.frac, cfg.seed, r)
        ref, batched = (e.run_round(r, sampled) for e in engines)
        for a, b in zip(ref, batched):
            assert b.train_loss == pytest.approx(a.train_loss, rel=1e-9)
            assert b.local_acc == a.local_acc and b.global_acc == a.global_acc
            assert b.epsilon == a.epsilon and a.epsilon > 0
    assert_same_states(*engines, 3)


def test_epsilon_is_reported_and_matches_opacus(tiny_config, tmp_path):
    cfg = dataclasses.replace(tiny_config, method="ppsgd", rounds=2, epsilon=3.0, output_dir=str(tmp_path))
    result = run(cfg, log=lambda _: None)
    eps = [r["epsilon"] for r in result.rounds]
    assert 0 < eps[0] < eps[1] <= 3.0 + 0.05  # the whole run spends the target, within the search's tolerance
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epsilon"] for r in metrics["rounds"]] == eps and metrics["headline"]["metric"] == "local_acc"
    engine_state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["engine"]
    sigma = engine_state["privacy"]["accountants"][0]["history"][0][0]
    direct = RDPAccountant()
    for _ in range(3 * 2):  # 60 samples / batch 20 = 3 steps per epoch, 1 epoch, 2 rounds
        direct.step(noise_multiplier=sigma, sample_rate=20 / 60)
    assert eps[1] == pytest.approx(direct.get_epsilon(1e-5, alphas=ALPHAS), rel=1e-12)


@pytest.mark.parametrize("method,uploaded", [
    ("dp-fedavg", "the whole CNN"), ("ppsgd", "the representation"), ("centaur", "the representation")])
def test_dp_methods_learn_at_a_loose_budget_and_upload_what_they_share(method, uploaded, tiny_config, tmp_path,
                                                                          monkeypatch):
    import hyperfl_fast.methods.base as base

    seen = []
    real_average = base.weighted_average
    monkeypatch.setattr(base, "weighted_average", lambda ups, ws: seen.append(ups) or real_average(ups, ws))
    cfg = dataclasses.replace(tiny_config, method=method, engine="reference", rounds=3, local_epochs=2,
                              epsilon=200.0, dp_clip=1.0, lr=0.1, output_dir=str(tmp_path))
    result = run(cfg, log=lambda _: None)
    assert result.final["headline_acc"] > 20.0  # chance is 10%
    representation = {name for name, _ in cnn_spec(1, 10).feature_shapes()}
    expected = representation | {"fc2.weight", "fc2.bias"} if uploaded == "the whole CNN" else representation
    assert all(set(upload) == expected for upload in seen[0])  # the private classifier never leaves (ppsgd, centaur)


def test_dp_flags_are_checked(tmp_path, capsys):
    from hyperfl_fast.train import main

    for flags, message in ((["--epsilon", "0"], "--epsilon must be a finite number in (0, inf)"),
                           (["--delta", "1"], "--delta must be a finite number in (0, 1)"),
                           (["--dp-clip", "nan"], "--dp-clip must be a finite number in (0, inf)")):
        assert main(["--dataset", "synthetic", "--method", "dp-fedavg", *flags, "--output-dir", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err


def test_resuming_a_dp_run_with_other_rounds_is_refused(tiny_config, tmp_path):
    from hyperfl_fast.config import ConfigError

    cfg = dataclasses.replace(tiny_config, method="dp-fedavg", rounds=1, output_dir=str(tmp_path))
    run(cfg, log=lambda _: None)
    with pytest.raises(ConfigError, match="derives its noise from the rounds"):
        run(dataclasses.replace(cfg, rounds=2), resume=True, log=lambda _: None)
    assert len(run(cfg, resume=True, log=lambda _: None).rounds) == 1  # the same --rounds reads it back


def test_poisson_batches_sample_each_record_independently():
    """--poisson: ceil(n / B) steps per epoch, each sample in a batch with probability B / n (sizes vary, some
    batches may be empty), keyed like every other draw; the noisy sum is divided by the expected size B."""
    from hyperfl_fast.dp import dp_sgd_step
    from hyperfl_fast.federation import poisson_masks

    _, masks = poisson_masks(600, 50, seed=0, round_idx=3, client=7, epoch=1)
    assert masks.shape == (12, 600)
    assert masks.float().mean().item() == pytest.approx(50 / 600, rel=0.1)
    assert len(set(masks.sum(1).tolist())) > 1  # batch sizes vary
    assert torch.equal(masks, poisson_masks(600, 50, 0, 3, 7, 1)[1])
    assert not torch.equal(masks, poisson_masks(600, 50, 0, 3, 7, 2)[1])
    _, clients = small_federation(clients=1, local_size=30)
    sizes = [len(y) for _, y in clients[0].poisson_batches(3, seed=0, round_idx=0, epoch=0)]
    assert len(sizes) == 10 and 0 in sizes  # an empty batch is still a (noise-only) step

    model = torch.nn.Linear(4, 3)
    before = model.weight.detach().clone()
    params = list(model.parameters())
    dp_sgd_step(model, params, torch.optim.SGD(params, lr=1.0), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                clip=0.5, sigma=2.0, generator=torch.Generator().manual_seed(5), denominator=10)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(before - model.weight.detach(), 2.0 * 0.5 * noise / 10)


def test_poisson_flag_reaches_the_run(tiny_config, tmp_path):
    from hyperfl_fast.train import main

    out = tmp_path / "run"
    assert main(["--dataset", "synthetic", "--method", "dp-fedavg", "--poisson", "--clients", "3", "--rounds", "1",
                 "--local-size", "40", "--test-size", "20", "--local-epochs", "1", "--batch-size", "10",
                 "--epsilon", "50", "--device", "cpu", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["poisson"] is True and metrics["rounds"][0]["epsilon"] > 0
