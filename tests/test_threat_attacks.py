"""The strongest attacks on HyperFL (privacy.analytic) and the client's psi check (methods.psi_check).

A small target CNN (one 3x3 conv with 16 channels on 12x12 images) keeps every case fast.
"""
import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

from hyperfl_fast.methods.psi_check import SENSITIVITY_FLOOR, embedding_sensitivity, refusals
from hyperfl_fast.models import CNNSpec, ConvSpec, HyperNetwork, extract_features, split_theta
from hyperfl_fast.privacy import AttackBudget, LocalTraining, psnr, reconstruct
from hyperfl_fast.privacy.analytic import (crafted_psi, evasive_psi, fc_inputs, imprint_scenario, imprint_theta,
                                           joint_scenario, summed_upload, true_theta)
from hyperfl_fast.privacy.threats import HyperFLClient, generated_update, hyperfl_upload

SPEC = CNNSpec(1, 12, (ConvSpec(1, 16, 3, 1),), hidden=32, num_classes=10)
LOW, HIGH = -2.0, 2.0  # (0 - 0.5) / 0.25 .. (1 - 0.5) / 0.25
BOUNDS = (torch.tensor(LOW).view(1, 1, 1), torch.tensor(HIGH).view(1, 1, 1))


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """n smooth images in the model's normalised range: (n, 1, 12, 12)."""
    coarse = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    return (nn.functional.interpolate(coarse, size=(12, 12), mode="bilinear", align_corners=False) - 0.5) / 0.25


def make_clients(n: int, batch: int, seed: int = 0) -> tuple[dict, list[HyperFLClient]]:
    torch.manual_seed(seed)
    hypernet = HyperNetwork(8, 16, SPEC.num_feature_params)
    psi = {k: t.detach() for k, t in hypernet.state_dict().items()}
    x = smooth_images(n * batch, seed)
    y = torch.randint(0, 10, (n * batch,), generator=torch.Generator().manual_seed(seed))
    return psi, [HyperFLClient(torch.randn(8), nn.Linear(32, 10), x[i * batch:(i + 1) * batch],
                               y[i * batch:(i + 1) * batch]) for i in range(n)]


def true_gradient(psi, client):
    """d loss / d theta of the client's generated network with its own classifier, computed directly."""
    theta = true_theta(psi, client.embedding).requires_grad_()
    logits = client.classifier(extract_features(client.x, split_theta(theta, SPEC), SPEC))
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, client.y), [theta])
    return theta.detach(), grad


def test_theta_and_its_gradient_are_read_off_a_one_step_upload_exactly(float64):
    """In float64 (in float32 the identity's round-off was 1.8e-5 on one machine and under 1e-5 on another)."""
    psi, (client,) = make_clients(1, 3)
    client.x = client.x.double()
    theta, grad = true_gradient(psi, client)
    got_theta, got_grad, _ = generated_update(psi, hyperfl_upload(SPEC, psi, client, LocalTraining(1, clip=50.0)),
                                              LocalTraining(1, clip=50.0))
    assert ((got_theta - theta).norm() / theta.norm()).item() < 1e-10
    scale = grad.norm() / got_grad.norm()  # the upload's gradient may be clipped as a whole
    assert ((got_grad * scale - grad).norm() / grad.norm()).item() < 1e-10
    assert 0 < scale <= 1.0 + 1e-12


def test_several_steps_are_read_with_their_weight_decay_taken_out():
    """Over several steps the heads' changes include weight decay on the heads themselves; taking it out gives
    theta closer to the truth than ignoring it (a strong weight decay makes the difference visible)."""
    psi, (client,) = make_clients(1, 2)
    training = LocalTraining(5, lr=0.01, weight_decay=0.05, clip=50.0)
    upload = hyperfl_upload(SPEC, psi, client, training)
    truth = true_theta(psi, client.embedding)

    def error(reading):
        theta, _, _ = generated_update(psi, upload, reading)
        return float((theta - truth).norm() / truth.norm())

    corrected, ignored = error(training), error(LocalTraining(5, lr=0.01, weight_decay=0.0, clip=50.0))
    assert corrected < 0.1 and corrected < 0.75 * ignored  # measured 0.074 against 0.114


def test_fc_inputs_are_exact_for_one_image():
    psi, (client,) = make_clients(1, 1)
    _, grad = true_gradient(psi, client)
    d = split_theta(grad, SPEC)
    params = split_theta(true_theta(psi, client.embedding), SPEC)
    with torch.no_grad():
        inputs = nn.functional.max_pool2d(nn.functional.leaky_relu(nn.functional.conv2d(
            client.x, params["conv1.weight"], params["conv1.bias"], padding=1), 0.01), 2).flatten(1)
    rows = fc_inputs(d["fc1.weight"], d["fc1.bias"])
    assert len(rows) == SPEC.hidden
    torch.testing.assert_close(rows, inputs.expand_as(rows), rtol=1e-3, atol=1e-5)


def test_joint_attack_inverts_a_one_image_upload_without_the_classifier():
    """For one image fc1's bias gradient is the upstream gradient: IG needs no classifier and gets the image back.
    Measured on this model (400 iterations, seeds 0-2): 30.8-33.4 dB (variant c, with its dummy classifier, on the
    same uploads: 26.6-35.8 dB); this case (seed 0) 30.8 dB."""
    psi, (client,) = make_clients(1, 1, seed=0)
    scenario = joint_scenario(SPEC, psi, [client], LocalTraining(1, clip=50.0))
    assert scenario.unknowns.init == {} and scenario.diagnostics["fc_input_rel_error"] < 1e-3
    rec = reconstruct(scenario.simulate, scenario.observed, tuple(client.x.shape), 10, BOUNDS, scenario.labels,
                      scenario.unknowns, "ig", AttackBudget(iterations=400))
    assert psnr((rec.images * 0.25 + 0.5).clamp(0, 1), (client.x * 0.25 + 0.5).clamp(0, 1)).item() > 25.0


def test_crafted_psi_makes_every_client_generate_theta_star():
    psi, clients = make_clients(4, 1)
    theta_star = imprint_theta(SPEC, smooth_images(200, 7), LOW, 8, torch.Generator().manual_seed(0))
    sent = crafted_psi(psi, theta_star)
    for client in clients:
        torch.testing.assert_close(true_theta(sent, client.embedding), theta_star, rtol=0, atol=0)
    assert not torch.equal(true_theta(psi, clients[0].embedding), true_theta(psi, clients[1].embedding))


def test_secure_aggregation_simulation_sums_the_uploads():
    """Under a crafted psi the summed heads-bias upload is the sum of the clients' own gradients of theta*,
    each computed directly with its own classifier; a sum of honest uploads is no single client's."""
    psi, clients = make_clients(3, 2)
    theta_star = imprint_theta(SPEC, smooth_images(200, 7), LOW, 6, torch.Generator().manual_seed(0))
    sent = crafted_psi(psi, theta_star)
    total = summed_upload(SPEC, sent, clients, LocalTraining(1))
    expected = sum(true_gradient(sent, c)[1] for c in clients)
    torch.testing.assert_close(total["heads.bias"], expected, rtol=1e-4, atol=1e-7)
    honest = summed_upload(SPEC, psi, clients, LocalTraining(1))
    alone = hyperfl_upload(SPEC, psi, clients[0], LocalTraining(1))
    assert not torch.allclose(honest["heads.bias"], alone["heads.bias"])


def test_imprint_recovers_fc1_inputs_of_several_clients_through_their_sum():
    """Trap rows calibrated for the summed batch isolate images: candidates within a few percent (the leaky
    ReLU's leak) of several images' fc1 inputs, measured by relative distance (seed 0: 4 of 6 images)."""
    psi, clients = make_clients(3, 2)
    theta_star = imprint_theta(SPEC, smooth_images(400, 9), LOW, 6, torch.Generator().manual_seed(0))
    scenario = imprint_scenario(SPEC, crafted_psi(psi, theta_star), clients, LocalTraining(1, clip=50.0))
    assert scenario.diagnostics["images_isolated"] >= 3
    assert scenario.diagnostics["isolated_median_error"] < 0.05
    assert scenario.shape == (scenario.diagnostics["candidates"], 1, 12, 12)


def test_sensitivity_is_the_jacobians_norm_relative_to_theta():
    torch.manual_seed(0)
    hypernet = HyperNetwork(6, 5, 7).double()
    psi = {k: t.detach() for k, t in hypernet.state_dict().items()}
    embeddings = torch.randn(3, 6, dtype=torch.float64)
    got = embedding_sensitivity(psi, embeddings)
    for v, s in zip(embeddings, got):
        jac = torch.autograd.functional.jacobian(lambda e: functional_call(hypernet, psi, (e,)), v)
        assert s.item() == pytest.approx((jac.norm() * v.norm() / hypernet(v).norm()).item(), rel=1e-10)


def test_psi_check_refuses_a_crafted_psi_accepts_honest_ones_and_misses_the_evasive_one():
    psi, clients = make_clients(4, 1)
    embeddings = torch.stack([c.embedding for c in clients])
    assert refusals(psi, embeddings) == [None] * 4
    theta_star = imprint_theta(SPEC, smooth_images(200, 7), LOW, 8, torch.Generator().manual_seed(0))
    assert all("barely depend on the embedding" in r for r in refusals(crafted_psi(psi, theta_star), embeddings))
    gen = torch.Generator().manual_seed(1)
    probes = torch.randn(32, 8, generator=gen)
    evasive = evasive_psi(psi, theta_star, SPEC, probes, 10 * SENSITIVITY_FLOOR, gen)
    assert embedding_sensitivity(evasive, probes).median().item() == pytest.approx(10 * SENSITIVITY_FLOOR, rel=1e-3)
    assert refusals(evasive, embeddings) == [None] * 4  # the check's known limit ...
    scenario = imprint_scenario(SPEC, evasive, clients, LocalTraining(1, clip=50.0))
    assert scenario.diagnostics["images_isolated"] >= 2  # ... and the traps still work


def test_training_with_psi_check_and_its_errors(tmp_path, capsys):
    from hyperfl_fast.config import Config, ConfigError
    from hyperfl_fast.methods import get_method
    from hyperfl_fast.runner import EveryClientRefused, accepting_clients
    from hyperfl_fast.train import main

    assert main(["--dataset", "synthetic", "--clients", "2", "--rounds", "1", "--local-epochs", "1",
                 "--local-size", "40", "--test-size", "20", "--psi-check", "--output-dir", str(tmp_path / "run")]) == 0
    assert "refused" not in capsys.readouterr().out  # an honest server's psi passes
    with pytest.raises(ConfigError, match="--psi-check: only hyperfl"):
        Config(method="fedavg", psi_check=True).validate()
    psi, clients = make_clients(2, 1)
    theta_star = imprint_theta(SPEC, smooth_images(50, 7), LOW, 2, torch.Generator().manual_seed(0))

    class Engine:  # what the round loop asks of an engine
        method = get_method("hyperfl")

        def global_state(self):
            return crafted_psi(psi, theta_star)

        def client_state(self, cid):
            return {"embedding": clients[cid].embedding}

    logged = []
    with pytest.raises(EveryClientRefused, match="every sampled client refused"):
        accepting_clients(Engine(), [0, 1], 0, logged.append)
    assert len(logged) == 2 and "client 1 refused" in logged[1]


def test_attack_cli_joint_imprint_secure_sum_and_psi_check(tmp_path, capsys):
    from hyperfl_fast.attack import main

    out = tmp_path / "attack"
    assert main(["--dataset", "synthetic", "--method", "hyperfl", "--attack", "joint", "imprint", "imprint-evasive",
                 "--clients-summed", "1", "3", "--batch-size", "2", "--iterations", "2", "--psi-check",
                 "--output-dir", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["attack"], r["clients_summed"]) for r in rows] == [(a, n) for a in ("joint", "imprint",
                                                                                  "imprint-evasive") for n in (1, 3)]
    assert [bool(r.get("refused")) for r in rows] == [False, False, True, True, False, False]
    assert rows[5]["images"] == 6 and rows[5]["candidates"] >= 1
    assert "| refused |" in (out / "table.md").read_text()
    assert main(["--dataset", "synthetic", "--method", "fedavg", "--attack", "joint", "--output-dir", str(out)]) == 2
    assert "add hyperfl to --method" in capsys.readouterr().err
    assert main(["--dataset", "synthetic", "--method", "hyperfl", "--attack", "imprint", "--batch-size", "50",
                 "--iterations", "1", "--output-dir", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["rows"][0]
    assert len(row["psnr_per_image"]) == len(row["ssim_per_image"]) == row["images"] == 50
    for args, message in ((["--attack", "imprint", "--batch-size", "64", "--clients-summed", "5000"],
                           "needs 320000 images"),
                          (["--attack", "ig", "--clients-summed", "3"], "--clients-summed applies to --attack joint"),
                          (["--attack", "ig", "--psi-check"], "--psi-check applies to --attack joint")):
        assert main(["--dataset", "synthetic", "--method", "hyperfl", *args, "--output-dir", str(out)]) == 2
        assert message in capsys.readouterr().err


def test_the_other_summed_clients_are_independent_draws():
    from hyperfl_fast.attack import other_clients

    (v1, c1), (v2, c2) = other_clients(SPEC, 2, 0, torch.device("cpu"))
    assert not torch.equal(v1, v2) and not torch.equal(c1.weight, c2.weight)


def test_a_flower_node_with_psi_check_refuses_a_crafted_psi(tmp_path, monkeypatch):
    """Over Flower the check is the node's own decision (node config psi-check), whatever the server's run config
    says: the node trains nothing and raises, so the server counts a failure; an honest psi trains."""
    from flwr.app import Context, RecordDict

    from hyperfl_fast.config import ConfigError
    from hyperfl_fast.flower.client import client_round
    from hyperfl_fast.flower.server_app import initial_global_state
    from hyperfl_fast.flower.settings import settings_from_run_config
    from hyperfl_fast.models import cnn_spec

    monkeypatch.setenv("HYPERFL_NODE_STATE_DIR", str(tmp_path))
    run_config = {"dataset": "synthetic", "clients": 2, "rounds": 1, "local-epochs": 1, "batch-size": 20,
                  "local-size": 40, "test-size": 20, "hidden-dim": 16, "device": "cpu"}
    psi = initial_global_state(settings_from_run_config(run_config).cfg)

    def node(check: bool):
        return Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2, "psi-check": check},
                       state=RecordDict(), run_config=run_config)

    spec = cnn_spec(1, 10)
    theta_star = imprint_theta(spec, torch.rand(50, 1, 28, 28), 0.0, 20, torch.Generator().manual_seed(0))
    crafted = crafted_psi(psi, theta_star)
    with pytest.raises(ConfigError, match="partition 0 refused what the server sent in round 1 \\(psi-check\\)"):
        client_round(node(True), crafted, 1)
    upload, _ = client_round(node(True), psi, 1)
    assert set(upload) == set(psi)
    upload, _ = client_round(node(False), crafted, 1)  # without the check the node trains the attacker's network
    assert upload["heads.weight"].abs().max() > 0


def test_imprint_on_a_clients_real_round():
    """The real round (one classifier epoch, then hypernetwork epochs over all of the client's images, the
    method's own client code): trap rows still isolate images, and joint reconstructs the asked number."""
    from hyperfl_fast.config import Config
    from hyperfl_fast.privacy.analytic import RealRound

    psi, clients = make_clients(2, 40)
    training = RealRound(Config(dataset="synthetic", batch_size=20, local_epochs=2))
    assert training.local_training(40).steps == 4
    theta_star = imprint_theta(SPEC, smooth_images(400, 9), LOW, 80, torch.Generator().manual_seed(0))
    scenario = imprint_scenario(SPEC, crafted_psi(psi, theta_star), clients, training)
    assert scenario.diagnostics["candidates"] >= 1
    joint = joint_scenario(SPEC, psi, clients[:1], training, reconstruct_images=3)
    assert joint.shape == (3, 1, 12, 12) and set(joint.unknowns.init) == {"cls.weight", "cls.bias"}
