"""DP that holds: secret noise by default, sigma from the steps actually taken, every client's epsilon, honest claims,
clear errors, and what a DP client sends over Flower."""
import dataclasses
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from hyperfl_fast.config import Config, ConfigError
from hyperfl_fast.dp import ClientPrivacy, NoiseSource, keyed_noise, noise_generator
from hyperfl_fast.engines import build_reference
from hyperfl_fast.models import cnn_spec
from hyperfl_fast.runner import run

from conftest import small_federation

FLAGS = ["--dataset", "synthetic", "--clients", "2", "--local-size", "20", "--test-size", "10", "--local-epochs", "1",
         "--batch-size", "10", "--rounds", "1", "--device", "cpu"]


def one_step_upload(dp_noise: str, seed: int = 0):
    """DP-FedAvg, one client, one local step over its whole data (B = n): (the change of the CNN it uploads,
    the model it started from, its data, its sigma)."""
    _, clients = small_federation(clients=1, local_size=12)
    cfg = Config(dataset="synthetic", method="dp-fedavg", clients=1, local_epochs=1, batch_size=12, rounds=1,
                 epsilon=4.0, lr=0.02, weight_decay=0.0, device="cpu", seed=seed, dp_noise=dp_noise)
    engine = build_reference(cnn_spec(1, 10), clients, cfg, torch.device("cpu"))
    start = {k: t.clone() for k, t in engine.global_state().items()}
    engine.run_round(0, [0])
    change = {k: engine.global_state()[k] - start[k] for k in start}
    return change, start, clients[0], engine.privacy.sigmas[0], cfg


def test_noise_is_secret_by_default_and_keyed_only_on_request():
    """The same seed gives the same run only with keyed noise; by default every run draws its own noise."""
    keyed = [one_step_upload("keyed")[0] for _ in range(2)]
    secure = [one_step_upload("secure")[0] for _ in range(2)]
    assert all(torch.equal(keyed[0][k], keyed[1][k]) for k in keyed[0])
    assert not torch.equal(secure[0]["fc1.weight"], secure[1]["fc1.weight"])
    source = NoiseSource("secure", seed=0)
    assert not torch.equal(source.sample(source.generator(0, 0, 0, 0), 1.0, torch.zeros(5)),
                           NoiseSource("secure", seed=0).sample(source.generator(1, 0, 0, 0), 1.0, torch.zeros(5)))


@pytest.mark.parametrize("dp_noise,recovered", [("keyed", True), ("secure", False)])
def test_replaying_the_noise_from_the_seed(dp_noise, recovered):
    """An attacker who knows the seed recomputes keyed noise and subtracts it: the clipped gradient comes back
    exactly.  The secure noise cannot be recomputed: what is left after the same subtraction is noise."""
    from hyperfl_fast.models import TargetCNN

    change, start, data, sigma, cfg = one_step_upload(dp_noise)
    noisy_mean = {k: -t / cfg.lr for k, t in change.items()}  # SGD's first step: buf = grad (no weight decay)
    n, generator = len(data.train_y), noise_generator(cfg.seed, 0, 0, 0, 0)
    replayed = {k: keyed_noise(generator, sigma * cfg.dp_clip, t) / n for k, t in noisy_mean.items()}
    model = TargetCNN(cnn_spec(1, 10))
    model.load_state_dict(start)
    clipped = {k: torch.zeros_like(t) for k, t in start.items()}
    for i in range(n):  # the batch is all of the client's data: the order of the sum does not matter
        model.zero_grad()
        F.cross_entropy(model(data.train_x[i][None]), data.train_y[i][None]).backward()
        norm = math.sqrt(sum(p.grad.pow(2).sum().item() for p in model.parameters()))
        for k, p in model.named_parameters():
            clipped[k] += min(1.0, cfg.dp_clip / (norm + 1e-6)) * p.grad / n

    def flat(d):
        return torch.cat([d[k].flatten() for k in clipped])

    cosine = F.cosine_similarity(flat({k: noisy_mean[k] - replayed[k] for k in clipped}), flat(clipped), dim=0)
    noisy_cosine = F.cosine_similarity(flat(noisy_mean), flat(clipped), dim=0)
    assert abs(noisy_cosine) < 0.3  # the noise hides the gradient either way ...
    assert (cosine > 0.9999) == recovered  # ... but only keyed noise can be taken off again
    if not recovered:
        assert abs(cosine) < 0.3


def test_sigma_follows_the_steps_actually_taken():
    """n = 60, B = 50: 2 steps per epoch, not 60/50 = 1.2; every client's final epsilon is within the target."""
    privacy = ClientPrivacy([60, 610, 600], batch_size=50, epsilon=4.0, delta=1e-5, rounds=3, local_epochs=5)
    assert privacy.steps_per_epoch == [2, 13, 12]
    for _ in range(3):
        privacy.record_round([0, 1, 2])
    final = privacy.epsilons()
    assert all(3.9 < eps <= 4.0 + 0.011 for eps in final), final  # the search's tolerance is 0.01


def test_the_reported_epsilon_is_every_clients_worst_and_each_one_is_kept(tmp_path, tiny_config):
    cfg = dataclasses.replace(tiny_config, method="dp-fedavg", clients=4, frac=0.5, rounds=2, epsilon=8.0,
                              output_dir=str(tmp_path))
    lines = []
    result = run(cfg, log=lines.append)
    record = result.final
    assert len(record["epsilons"]) == 4 and record["epsilon"] == max(record["epsilons"])
    assert record["epsilon"] >= max(c["epsilon"] for c in record["clients"])  # not only this round's clients
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["privacy"]["private"] and metrics["privacy"]["noise"] == "secure"
    assert metrics["privacy"]["epsilon_is"].startswith("nominal") and "record-level" in metrics["privacy"]["covers"]
    assert any("(max over 4 clients, nominal)" in line for line in lines)


def test_representation_methods_say_what_their_epsilon_covers(tmp_path, tiny_config, capsys):
    from hyperfl_fast.train import build_parser

    cfg = dataclasses.replace(tiny_config, method="centaur", rounds=1, output_dir=str(tmp_path))
    lines = []
    run(cfg, log=lines.append)
    covers = json.loads((tmp_path / "metrics.json").read_text())["privacy"]["covers"]
    assert "not a record-level guarantee" in covers and any("not a record-level guarantee" in l for l in lines)
    assert "not the client's records" in " ".join(build_parser().format_help().split())


def test_keyed_noise_is_marked_not_private(tmp_path, tiny_config):
    cfg = dataclasses.replace(tiny_config, method="dp-fedavg", rounds=1, dp_noise="keyed", output_dir=str(tmp_path))
    lines = []
    run(cfg, log=lines.append)
    assert json.loads((tmp_path / "metrics.json").read_text())["privacy"]["private"] is False
    assert any("this run is NOT private" in line for line in lines)
    assert any("keyed noise: NOT private" in line for line in lines if line.startswith("round"))


def test_a_budget_no_noise_can_meet_is_one_line_before_any_data_is_read(tmp_path, capsys):
    from hyperfl_fast.train import main

    # fmnist from a folder that does not exist: the budget is refused before the dataset is looked for
    assert main(["--dataset", "fmnist", "--data-dir", str(tmp_path / "nowhere"), "--method", "dp-fedavg",
                 "--epsilon", "1e-3", "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --epsilon 0.001: epsilon 0.001 at delta 1e-05 is too small for") and \
        len(err.splitlines()) == 1 and "raise --epsilon" in err


def test_weak_budgets_warn_and_opacus_stays_quiet(tmp_path, tiny_config):
    cfg = dataclasses.replace(tiny_config, method="dp-fedavg", rounds=1, epsilon=1e9, delta=0.5,
                              output_dir=str(tmp_path))
    lines = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(cfg, log=lines.append)
    assert any("--epsilon 1e+09 is effectively not private" in line for line in lines)
    assert any("--delta 0.5 is at least 1/n" in line for line in lines)
    assert not [w for w in caught if "Optimal order" in str(w.message)]


def test_poisson_is_refused_for_a_method_without_dp():
    with pytest.raises(ConfigError, match="--poisson samples DP-SGD batches: it applies to dp-fedavg, centaur, ppsgd"):
        Config(method="hyperfl", poisson=True, device="cpu").validate()


def test_over_flower_a_client_sends_only_what_aggregation_needs(monkeypatch):
    pytest.importorskip("flwr")
    from flwr.app import Context, RecordDict

    from hyperfl_fast.flower import client
    from hyperfl_fast.flower.settings import refuse_keyed_noise, settings_from_run_config

    base = {"dataset": "synthetic", "clients": 2, "local-size": 20, "test-size": 10, "local-epochs": 1,
            "batch-size": 10, "rounds": 1, "device": "cpu"}
    metrics = {"num-examples": 20, "partition-id": 1, "train-loss": 0.5, "local-acc": 60.0, "epsilon": 1.2}
    aggregation = {"num-examples", "partition-id"}
    for method, opt_in, kept in (("dp-fedavg", False, aggregation), ("dp-fedavg", True, set(metrics)),
                                 ("hyperfl", False, aggregation), ("hyperfl", True, set(metrics))):
        run_config = {**base, "method": method, "client-metrics": opt_in}
        context = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2},
                          state=RecordDict(), run_config=run_config)
        assert set(client.replied_metrics(context, metrics)) == kept
    with pytest.raises(ConfigError, match='dp-noise "keyed" is reproducible from the run\'s seed'):
        refuse_keyed_noise(settings_from_run_config({**base, "method": "ppsgd", "dp-noise": "keyed"}).cfg)
    refuse_keyed_noise(settings_from_run_config({**base, "method": "hyperfl", "dp-noise": "keyed"}).cfg)  # no DP


def test_the_flower_server_accounts_each_clients_epsilon_itself(tmp_path):
    """The server needs no epsilon from the clients: from their data sizes and the rounds they trained in it
    computes what the in-process engines report."""
    pytest.importorskip("flwr")
    from types import SimpleNamespace

    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from hyperfl_fast.flower.server_app import UploadAuditingFedAvg
    from hyperfl_fast.flower.settings import settings_from_run_config

    settings = settings_from_run_config({"dataset": "synthetic", "clients": 3, "method": "dp-fedavg",
                                         "epsilon": 6.0, "rounds": 4, "min-clients": 2, "output-dir": str(tmp_path)})
    strategy = UploadAuditingFedAvg(settings, {"w": (3,)})
    strategy.current = {"w": torch.zeros(3)}
    sizes = [60, 47, 60]
    for round_idx, pids in enumerate([[0, 1, 2], [0, 2]]):
        replies = [SimpleNamespace(has_error=lambda: False,
                                   metadata=SimpleNamespace(src_node_id=pid + 1, reply_to_message_id=""),
                                   content=RecordDict({"arrays": ArrayRecord({"w": torch.ones(3)}),
                                                       "metrics": MetricRecord({"num-examples": sizes[pid],
                                                                                "partition-id": pid})}))
                   for pid in pids]
        strategy.aggregate_train(round_idx + 1, replies)
    want = ClientPrivacy.from_config(sizes, settings.cfg)
    want.record_round([0, 1, 2])
    want.record_round([0, 2])
    assert [strategy.privacy[pid].epsilons()[0] for pid in range(3)] == want.epsilons()


def test_checkpoints_from_before_secret_noise_resume_as_they_were_written(tiny_config, tmp_path):
    """A checkpoint without ``dp_noise`` was written with keyed noise: a DP run resumes it only with
    --dp-noise keyed, and a run without DP resumes it whatever the setting says."""
    import dataclasses

    from hyperfl_fast.config import ConfigError
    from hyperfl_fast.runner import check_resumable

    for method, resumes_with_secure in [("fedavg", True), ("dp-fedavg", False)]:
        cfg = dataclasses.replace(tiny_config, method=method)
        saved = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dp_noise"}
        if resumes_with_secure:
            check_resumable(tmp_path, {"config": saved}, cfg)
        else:
            with pytest.raises(ConfigError, match=r"different settings \(dp_noise\)"):
                check_resumable(tmp_path, {"config": saved}, cfg)
        check_resumable(tmp_path, {"config": saved}, dataclasses.replace(cfg, dp_noise="keyed"))


def test_a_secure_dp_run_resumes_with_its_accounting(tiny_config, tmp_path):
    """Secret noise is drawn afresh after a crash (nothing to replay), and the accounting carries on: the resumed
    run spends exactly the epsilon of an unbroken one."""
    cfg = dataclasses.replace(tiny_config, method="dp-fedavg", rounds=2, epsilon=8.0)
    straight = run(dataclasses.replace(cfg, output_dir=str(tmp_path / "a")), log=lambda _: None)

    class Crash(Exception):
        pass

    def crash_after_round_1(line):
        if line.startswith("round    1/"):
            raise Crash

    broken = dataclasses.replace(cfg, output_dir=str(tmp_path / "b"))
    with pytest.raises(Crash):
        run(broken, log=crash_after_round_1)
    resumed = run(broken, resume=True, log=lambda _: None)
    assert [r["round"] for r in resumed.rounds] == [1, 2]
    for a, b in zip(straight.rounds, resumed.rounds):
        assert a["epsilons"] == pytest.approx(b["epsilons"], rel=1e-12)
    assert straight.rounds[1]["train_loss"] != resumed.rounds[1]["train_loss"]  # other noise: not replayable
