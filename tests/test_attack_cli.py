"""The attack CLI: device choice, clear one-line errors before any work, a readable grid, defaults in --help."""
import json

import pytest
import torch

from hyperfl_fast.attack import build_parser, grid_figure, main
from hyperfl_fast.train import main as train_main

FAST = ["--dataset", "synthetic", "--iterations", "1", "--variant", "c"]
TRAIN = ["--clients", "3", "--local-size", "40", "--test-size", "20", "--local-epochs", "1", "--batch-size", "20",
         "--device", "cpu", "--rounds", "1"]


@pytest.fixture(scope="module")
def hyperfl_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    assert train_main(["--dataset", "synthetic", *TRAIN, "--output-dir", str(out)]) == 0
    return out / "checkpoint.pt"


def test_device_flag(tmp_path, capsys):
    out = tmp_path / "attack"
    assert main(FAST + ["--method", "fedavg", "--device", "cpu", "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["config"]["device"] == "cpu"
    code = main(FAST + ["--method", "fedavg", "--device", "cuda", "--output-dir", str(tmp_path / "gpu")])
    if torch.cuda.is_available():
        assert code == 0
    else:
        assert code == 2 and "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_attack_from_a_checkpoint(hyperfl_checkpoint, tmp_path):
    out = tmp_path / "attack"
    assert main(FAST + ["--method", "hyperfl", "--checkpoint", str(hyperfl_checkpoint), "--client", "2",
                        "--output-dir", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["rows"][0]["variant"] == "c"


@pytest.mark.parametrize("method,engine", [("hyperfl", "reference"), ("fedavg", "reference"), ("fedavg", "batched"),
                                           ("pfedhn", "batched"), ("pfedhn-pc", "reference")])
def test_attack_reads_either_engines_checkpoint(method, engine, tmp_path):
    """The attacked model is the one saved: loading it sets the global (and, for HyperFL, the client's) state."""
    from hyperfl_fast.attack import build_parser, load_models
    from hyperfl_fast.models import cnn_spec

    run = tmp_path / "run"
    assert train_main(["--dataset", "synthetic", "--method", method, "--engine", engine, *TRAIN,
                       "--output-dir", str(run)]) == 0
    args = build_parser().parse_args(FAST + ["--method", method, "--checkpoint", str(run / "checkpoint.pt"),
                                             "--client", "1"])
    fedavg_model, (hypernet, embedding, classifier) = load_models(args, cnn_spec(1, 10), torch.device("cpu"))
    saved = torch.load(run / "checkpoint.pt", weights_only=True)["engine"]
    if method == "fedavg":
        want = saved["global"]["fc1.weight"]  # one layout, whichever engine wrote it
        assert torch.equal(fedavg_model.fc1.weight.detach(), want)
    elif method.startswith("pfedhn"):  # the CNN the server generates for client 1 (and its own classifier)
        server, spec = saved["global"], cnn_spec(1, 10)
        hidden = server["embeddings"][1]
        for layer in ("trunk.0", "trunk.1", "trunk.2"):  # pFedHN's hypernetwork: 3 layers with a ReLU, then 2 without
            hidden = torch.relu(hidden @ server[f"{layer}.weight"].T + server[f"{layer}.bias"])
        theta = (hidden @ server["fc.weight"].T + server["fc.bias"]) @ server["heads.weight"].T + server["heads.bias"]
        assert torch.allclose(fedavg_model.conv1.weight.detach().flatten(), theta[:spec.convs[0].out_channels * 25])
        want = saved["clients"][1]["fc2.weight"] if method == "pfedhn-pc" else \
            theta[spec.num_feature_params:spec.num_feature_params + 10 * spec.hidden].view(10, spec.hidden)
        assert torch.allclose(fedavg_model.fc2.weight.detach(), want)
    else:
        assert torch.equal(embedding, saved["clients"][1]["embedding"])
        assert torch.equal(classifier.weight.detach(), saved["clients"][1]["classifier.weight"])
        assert torch.equal(hypernet.heads.bias.detach(), saved["global"]["heads.bias"])


def damaged(path, tmp_path):
    bad = tmp_path / "damaged.pt"
    bad.write_bytes(path.read_bytes()[:1000])
    return bad


@pytest.mark.parametrize("case,message", [
    ("missing", "--checkpoint {path}: no such file"),
    ("client", "--client 3: {path} holds clients 0 to 2"),
    ("corrupted", "{path} is not a readable checkpoint"),
    ("dataset", "--checkpoint {path} holds a synthetic model, which does not fit --dataset synthetic-rgb"),
    ("method", "--checkpoint {path} holds a hyperfl run; it cannot serve --method fedavg"),
])
def test_checkpoint_problems_are_one_line(case, message, hyperfl_checkpoint, tmp_path, capsys):
    path = {"missing": tmp_path / "nope.pt", "corrupted": damaged(hyperfl_checkpoint, tmp_path)}.get(
        case, hyperfl_checkpoint)
    flags = ["--dataset", "synthetic", "--iterations", "1", "--variant", "c", "--method",
             "fedavg" if case == "method" else "hyperfl", "--checkpoint", str(path), "--output-dir",
             str(tmp_path / "out")]
    if case == "client":
        flags += ["--client", "3"]
    if case == "dataset":
        flags[1] = "synthetic-rgb"
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(path=path)) and err.count("\n") == 1


def test_unwritable_output_folder_is_refused_before_the_attack(tmp_path, capsys, monkeypatch):
    import hyperfl_fast.attack as attack

    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(attack, "reconstruct", lambda *a, **k: pytest.fail("the attack started"))
    assert main(FAST + ["--output-dir", str(tmp_path / "file")]) == 2
    assert "--output-dir" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


def test_grid_figure_labels_rows_and_scores():
    truth = torch.rand(2, 1, 28, 28)
    rows = [{"method": "fedavg", "variant_name": "IG", "setting": "step", "psnr_per_image": [17.25, 9.5],
             "ssim_per_image": [0.6941, 0.1]},
            {"method": "hyperfl", "variant_name": "structure-aware (rank-one heads)", "setting": "round",
             "psnr_per_image": [10.3, 11.0], "ssim_per_image": [0.086, 0.09]}]
    fig = grid_figure(truth, [torch.rand(2, 1, 28, 28), torch.rand(2, 1, 28, 28)], rows, [6, 2])
    axes = fig.axes
    assert len(axes) == 6
    assert axes[0].get_ylabel() == "ground truth" and axes[0].get_xlabel() == "label 6"
    assert axes[2].get_ylabel() == "fedavg\nIG\nstep" and axes[2].get_xlabel() == "PSNR 17.2 dB\nSSIM 0.694"
    assert axes[4].get_ylabel().startswith("hyperfl\nstructure-aware") and axes[5].get_xlabel().startswith("PSNR 11.0")


def test_help_shows_every_default():
    parser = build_parser()
    text = parser.format_help()
    text = text[text.index("options:"):]
    for action in parser._actions:
        if action.dest != "help":
            flag = action.option_strings[-1]
            block = text[text.index(flag):]
            nxt = block.find("\n  --", 1)
            assert "(default:" in block[:nxt if nxt > 0 else None], flag
