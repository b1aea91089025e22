"""HyperFL-LPM: hypernetwork-generated adapters on a frozen backbone (ResNet-18, ViT-S/16's design).

Tiny settings only (synthetic 32x32 data, a few clients, random backbones): ResNet-18 itself at 32x32 pixels,
and ``vit-tiny``, the ViT-S/16 design at 2 blocks of width 32.
"""
import json

import pytest
import torch

from hyperfl_fast.backbones import BACKBONES, backbone_features, client_adapt, lpm_spec
from hyperfl_fast.config import Config, ConfigError
from hyperfl_fast.engines import build_batched, build_reference
from hyperfl_fast.federation import build_clients, load_partition, sample_clients
from hyperfl_fast.methods import get_method
from hyperfl_fast.models import split_flat

pytest.importorskip("timm")  # installed by `make test`; the extra is hyperfl_fast[lpm]

SETTINGS = dict(dataset="synthetic-rgb", method="hyperfl-lpm", clients=3, local_epochs=1, batch_size=16,
                local_size=40, test_size=20, hidden_dim=8, device="cpu", lr=0.05)


def federation(backbone, sizes=(40, 33, 26), **extra):
    """Config, spec and clients (client i keeps the first sizes[i] training samples), in the default dtype."""
    cfg = Config(**{**SETTINGS, "backbone": backbone, **extra}).validate()
    dataset, splits, spec = load_partition(cfg, log=lambda _: None)
    clients = build_clients(dataset, splits, torch.device("cpu"))
    dtype = torch.get_default_dtype()
    for client, size in zip(clients, sizes):
        client.train_x, client.train_y = client.train_x[:size].to(dtype), client.train_y[:size]
        client.test_x = client.test_x.to(dtype)
    return cfg, spec, clients


@pytest.mark.parametrize("backbone", ["vit-tiny", "resnet18"])
def test_batched_engine_equals_reference(backbone, float64):
    """Two rounds on unequal clients (padded batches; 33 samples in batches of 16 leave a batch of one image): psi,
    every client's embedding and head, and the round's figures agree: to 1e-9 for the ViT, 1e-7 for the ResNet
    (a random ResNet-18's features reach 1e5 and its heads' weights 1e7, where float64 rounding of the frozen
    convolutions over N B images or B images shows at 1e-8 after two rounds; 1e-11 after one)."""
    cfg, spec, clients = federation(backbone)
    rtol = 1e-9 if backbone == "vit-tiny" else 1e-7
    engines = [build(spec, clients, cfg, torch.device("cpu")) for build in (build_reference, build_batched)]
    for r in range(2):
        sampled = sample_clients(3, cfg.frac, cfg.seed, r)
        ref, batched = (engine.run_round(r, sampled) for engine in engines)
        for a, b in zip(ref, batched):
            assert b.train_loss == pytest.approx(a.train_loss, rel=rtol)
            assert (b.local_acc, b.global_acc) == (a.local_acc, a.global_acc)
    ref, batched = engines
    pairs = [(ref.global_state(), batched.global_state())] + [(ref.client_state(c), batched.client_state(c))
                                                              for c in range(3)]
    for want, got in pairs:
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=1e-12)
    assert set(ref.client_state(0)) == {"embedding", *(k for k, _ in spec.head_shapes())}


@pytest.mark.parametrize("method,backbone,adapters", [("fedavg", "vit-tiny", "off"), ("local", "vit-tiny", "on"),
                                                     ("fedavg", "resnet18", "on"), ("local", "resnet18", "off")])
def test_table_2_baselines_agree_between_engines(method, backbone, adapters, float64):
    """Local and FedAvg on a backbone, with a fixed feature extractor (adapters off, the paper's dagger) or trained
    adapters (on, double dagger): two rounds on unequal clients give the same states and figures on both engines."""
    cfg, spec, clients = federation(backbone, method=method, adapters=adapters)
    engines = [build(spec, clients, cfg, torch.device("cpu")) for build in (build_reference, build_batched)]
    for r in range(2):
        ref, batched = (engine.run_round(r, [0, 1, 2]) for engine in engines)
        for a, b in zip(ref, batched):
            assert b.train_loss == pytest.approx(a.train_loss, rel=1e-9)
            assert (b.local_acc, b.global_acc) == (a.local_acc, a.global_acc)
    ref, batched = engines
    states = [(ref.global_state(), batched.global_state())] + [(ref.client_state(c), batched.client_state(c))
                                                               for c in range(3)]
    model = ref.global_state() or ref.client_state(0)
    assert any(k.startswith("adapter") for k in model) == (adapters == "on")
    for want, got in states:
        assert set(got) == set(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backbone", ["vit-tiny", "resnet18"])
def test_every_generated_adapter_reaches_the_model(backbone):
    """The authors' bug 1 (ResNet adapters silently never loaded): here changing psi changes the output, and the
    loss has a non-zero gradient in every generated adapter tensor."""
    cfg, spec, clients = federation(backbone)
    method = get_method("hyperfl-lpm")
    torch.manual_seed(0)
    psi, privates = method.init_states(spec, 3, cfg, torch.device("cpu"))
    x = clients[0].test_x[:8]
    before = method.predict(spec, psi, privates[0])(x)
    changed = {**psi, "heads.bias": psi["heads.bias"] + 0.1 * torch.randn_like(psi["heads.bias"])}
    assert (method.predict(spec, changed, privates[0])(x) - before).abs().max() > 1e-3

    theta = torch.randn(spec.num_feature_params, requires_grad=True)
    adapters = split_flat(theta, spec.adapter_shapes())
    features = backbone_features(x, spec, client_adapt(adapters, spec))
    features.square().sum().backward()
    for name, grad in split_flat(theta.grad, spec.adapter_shapes()).items():
        assert grad.abs().max() > 0, f"{name} does not reach the model"


@pytest.mark.parametrize("engine", [build_reference, build_batched])
def test_the_backbone_stays_frozen_and_only_psi_leaves_a_client(engine):
    cfg, spec, clients = federation("resnet18")
    frozen = {k: t.clone() for k, t in spec.module.state_dict().items()}  # BatchNorm statistics included
    trained = engine(spec, clients, cfg, torch.device("cpu"))
    trained.run_round(0, [0, 1, 2])
    assert all(torch.equal(t, frozen[k]) for k, t in spec.module.state_dict().items())
    assert not any(p.requires_grad for p in spec.module.parameters())
    update = get_method("hyperfl-lpm").client_update(spec, trained.global_state(), trained.client_state(0),
                                                     clients[0], cfg, 1)
    assert set(update.upload) == {"fc.weight", "fc.bias", "heads.weight", "heads.bias"}
    assert update.upload["heads.weight"].shape == (spec.num_feature_params, cfg.hidden_dim)


def test_adapter_sizes_are_the_papers():
    """About 352k generated values for ResNet-18 and 235k for ViT-S/16 (the authors' hypernetwork heads)."""
    sizes = {name: lpm_spec_sizes(name) for name in ("resnet18", "vit-s16")}
    assert sizes == {"resnet18": 352_000, "vit-s16": 235_296}


def lpm_spec_sizes(name):
    from hyperfl_fast.backbones import LPMSpec

    return LPMSpec(BACKBONES[name], 10, module=None).num_feature_params


@pytest.mark.parametrize("method,backbone,dataset", [("hyperfl-lpm", "resnet18", "synthetic-rgb"),
                                                    ("hyperfl-lpm", "vit-tiny", "synthetic"),
                                                    ("fedavg", "vit-tiny", "synthetic-rgb")])
def test_one_round_from_the_command_line(method, backbone, dataset, tmp_path, capsys):
    """A random backbone is said on every round's line and in metrics.json; 1-channel 28x28 images are repeated
    to 3 channels and (ViT) resized to the backbone's input."""
    from hyperfl_fast.train import main

    out = tmp_path / "run"
    assert main(["--method", method, "--backbone", backbone, "--dataset", dataset, "--clients", "2",
                 "--local-size", "32", "--test-size", "16", "--local-epochs", "1", "--hidden-dim", "8", "--rounds", "1",
                 "--device", "cpu", "--output-dir", str(out)]) == 0
    log = capsys.readouterr().out
    assert "RANDOM backbone" in next(line for line in log.splitlines() if line.startswith("round"))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backbone"]["pretrained"] is False and "randomly initialised" in metrics["backbone"]["note"]
    assert metrics["config"]["lr"] == BACKBONES[backbone].lr and metrics["config"]["batch_size"] == 16
    assert 0 <= metrics["rounds"][0]["local_acc"] <= 100


def test_a_run_resumes_to_the_same_result(tmp_path, capsys):
    from hyperfl_fast.train import main

    flags = ["--method", "hyperfl-lpm", "--backbone", "vit-tiny", "--dataset", "synthetic-rgb", "--clients", "2",
             "--local-size", "32", "--test-size", "16", "--local-epochs", "1", "--hidden-dim", "8", "--device", "cpu"]
    assert main(flags + ["--rounds", "2", "--output-dir", str(tmp_path / "straight")]) == 0
    assert main(flags + ["--rounds", "1", "--output-dir", str(tmp_path / "resumed")]) == 0
    assert main(flags + ["--rounds", "2", "--output-dir", str(tmp_path / "resumed"), "--resume"]) == 0
    capsys.readouterr()
    rounds = [json.loads((tmp_path / run / "metrics.json").read_text())["rounds"] for run in ("straight", "resumed")]
    assert [r["train_loss"] for r in rounds[0]] == [r["train_loss"] for r in rounds[1]]


def test_backbone_weights_round_trip(tmp_path):
    """A saved state dict (with the pre-trained classifier, which is dropped) loads into a fresh build exactly."""
    torch.manual_seed(1)
    source = BACKBONES["vit-tiny"].build()
    state = {**source.state_dict(), "head.weight": torch.zeros(1000, 32), "head.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "vit.pt")
    torch.manual_seed(2)
    spec = lpm_spec("vit-tiny", 10, torch.device("cpu"), str(tmp_path / "vit.pt"))
    assert all(torch.equal(t, source.state_dict()[k]) for k, t in spec.module.state_dict().items())


@pytest.mark.parametrize("content,message", [
    ("wrong-shape", "does not fit vit-tiny: patch_embed.proj.weight is (32, 3, 16, 16), vit-tiny needs (32, 3, 8, 8)"),
    ("missing", "does not fit vit-tiny: missing"),
    ("not-torch", "is not a torch state dict"),
    ("absent", "does not exist"),
])
def test_a_bad_backbone_weights_file_is_one_line(content, message, tmp_path, capsys):
    from hyperfl_fast.train import main

    path = tmp_path / "weights.pt"
    state = BACKBONES["vit-tiny"].build().state_dict()
    if content == "wrong-shape":
        torch.save({**state, "patch_embed.proj.weight": torch.zeros(32, 3, 16, 16)}, path)
    elif content == "missing":
        torch.save({k: t for k, t in state.items() if not k.startswith("blocks.1.")}, path)
    elif content == "not-torch":
        path.write_text("not a checkpoint")
    assert main(["--method", "hyperfl-lpm", "--backbone", "vit-tiny", "--backbone-weights", str(path),
                 "--dataset", "synthetic-rgb", "--rounds", "1", "--device", "cpu",
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --backbone-weights: ") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("settings,message", [
    (dict(method="hyperfl-lpm"), "--method hyperfl-lpm adapts a pre-trained model: give --backbone"),
    (dict(method="dp-fedavg", backbone="resnet18"), "--backbone: dp-fedavg trains the paper's small CNN; local, "
                                                   "fedavg, hyperfl-lpm run on a backbone"),
    (dict(method="hyperfl-lpm", backbone="resnet18", adapters="off"), "--adapters off: hyperfl-lpm is generated"),
    (dict(method="local", backbone="resnet18", adapters="yes"), "--adapters must be on or off"),
    (dict(method="local", adapters="on"), "--adapters: give --backbone too"),
    (dict(method="hyperfl-lpm", backbone="resnet50"), "--backbone: unknown backbone 'resnet50'"),
    (dict(method="hyperfl", backbone_weights="w.pt"), "--backbone-weights: give --backbone too"),
])
def test_backbone_settings_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        Config(**settings).validate()


def test_spec_is_built_from_the_seed():
    """Every process of a run (e.g. each Flower node) builds the same random backbone."""
    a, b = (lpm_spec("vit-tiny", 10, torch.device("cpu")) for _ in range(2))
    assert not all(torch.equal(t, b.module.state_dict()[k]) for k, t in a.module.state_dict().items())
    cfg = Config(**SETTINGS, backbone="vit-tiny").validate()
    specs = [load_partition(cfg, log=lambda _: None)[2] for _ in range(2)]
    assert all(torch.equal(t, specs[1].module.state_dict()[k]) for k, t in specs[0].module.state_dict().items())


def test_the_table_2_report_lists_every_paper_figure_and_ours_beside_them():
    from hyperfl_fast.methods.hyperfl_lpm import TABLE_2
    from hyperfl_fast.reproduce_lpm import table2_markdown

    empty = table2_markdown([], "settings")
    assert all(f"{figure:.2f}" in empty for row in TABLE_2.values() for figure in row) and len(TABLE_2) == 4
    ran = table2_markdown([{"dataset": "cifar10", "backbone": "vit-s16", "column": "HyperFL-LPM", "seed": s,
                            "final": f, "seconds_per_round": 1.0} for s, f in ((0, 95.0), (1, 96.0))], "settings")
    assert "95.50 / 95.40 (+0.10)" in ran


@pytest.mark.parametrize("flag,message", [("vit-tiny=/nonexistent.pt", "/nonexistent.pt does not exist"),
                                          ("vit-tiny", "'vit-tiny' is not BACKBONE=FILE")])
def test_table_2_weight_files_are_checked_first(flag, message, capsys):
    from hyperfl_fast.reproduce import main

    assert main(["--table", "2", "--backbones", "vit-tiny", "--backbone-weights", flag]) == 2
    assert message in capsys.readouterr().err


def test_the_attack_cli_reads_the_adapters_off_an_lpm_upload_and_inverts_them(tmp_path):
    """IG on a HyperFL-LPM upload (structure-aware): the client's generated adapters come out of its hypernetwork
    upload exactly (one step), then its images are matched through the known frozen backbone."""
    from hyperfl_fast.attack import main

    out = tmp_path / "attack"
    assert main(["--method", "hyperfl-lpm", "--backbone", "vit-tiny", "--dataset", "synthetic-rgb", "--batch-size",
                 "2", "--iterations", "5", "--output-dir", str(out)]) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["method"] == "hyperfl-lpm" and row["variant"] == "c" and len(row["psnr_per_image"]) == 2
    assert row["theta_rel_error"] < 1e-5 and row["hidden_cosine"] > 0.9999


@pytest.mark.parametrize("flags,message", [
    (["--method", "hyperfl-lpm", "--backbone", "vit-tiny", "--checkpoint", "x.pt"],
     "--checkpoint: attacking a trained hyperfl-lpm run"),
    (["--method", "fedavg", "--backbone", "vit-tiny"],
     "--backbone and --backbone-weights apply to --method hyperfl-lpm"),
])
def test_attack_cli_lpm_errors(flags, message, tmp_path, capsys):
    from hyperfl_fast.attack import main

    assert main([*flags, "--output-dir", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_table_2_refuses_a_weight_file_that_does_not_fit_before_any_run(tmp_path, capsys):
    from hyperfl_fast.reproduce import main

    torch.save(BACKBONES["resnet18"].build().state_dict(), tmp_path / "r18.pt")
    assert main(["--table", "2", "--backbones", "vit-tiny", "--backbone-weights", f"vit-tiny={tmp_path / 'r18.pt'}",
                 "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not fit vit-tiny" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
