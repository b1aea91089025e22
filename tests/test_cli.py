"""CLI: a smoke run writes its metrics; every bad flag is a clear error before any work starts."""
import json

import pytest

from hyperfl_fast.train import main

SMALL = ["--dataset", "synthetic", "--clients", "3", "--local-size", "40", "--test-size", "20",
         "--local-epochs", "1", "--batch-size", "20", "--device", "cpu"]


def test_smoke_run_writes_metrics(tmp_path, capsys):
    assert main(SMALL + ["--rounds", "2", "--output-dir", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["config"]["clients"] == 3 and metrics["config"]["method"] == "hyperfl"
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert csv_lines[0] == "round,train_loss,local_acc,global_acc,headline_acc,seconds" and len(csv_lines) == 3
    out = capsys.readouterr().out
    assert "round    2/2" in out and "headline (mean local accuracy, the figure the paper reports for hyperfl)" in out


@pytest.mark.parametrize("flags,message", [
    (["--frac", "0"], "--frac must be a finite number in (0, 1], got 0"),
    (["--frac", "1.5"], "--frac must be a finite number in (0, 1]"),
    (["--frac", "nan"], "--frac must be a finite number in (0, 1], got nan"),
    (["--clients", "0"], "--clients must be a positive integer"),
    (["--rounds", "-1"], "--rounds must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--local-size", "0"], "--local-size must be a positive integer"),
    (["--local-epochs", "0"], "--local-epochs must be a positive integer"),
    (["--lr", "0"], "--lr must be a finite number in (0, 10]"),
    (["--lr", "1e6"], "--lr must be a finite number in (0, 10], got 1000000.0"),
    (["--lr", "nan"], "--lr must be a finite number in (0, 10], got nan"),
    (["--lr", "inf"], "--lr must be a finite number in (0, 10], got inf"),
    (["--classifier-lr", "-0.1"], "--classifier-lr must be a finite number in (0, 10]"),
    (["--momentum", "1"], "--momentum must be a finite number in [0, 1), got 1"),
    (["--momentum", "-0.5"], "--momentum must be a finite number in [0, 1)"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number in [0, 1), got inf"),
    (["--grad-clip", "0"], "--grad-clip must be a finite number in (0, inf)"),
    (["--grad-clip", "nan"], "--grad-clip must be a finite number in (0, inf), got nan"),
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--client-init", "copied"], "--client-init: unknown choice 'copied'"),
    (["--precision", "bf16"], "--precision must be one of fp32, tf32, got 'bf16'"),
    (["--method", "fedprox"], "unknown method 'fedprox'"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--clients", "500", "--iid"], "lower --clients or --local-size"),
])
def test_bad_flags_are_clear_errors(flags, message, tmp_path, capsys):
    assert main(SMALL + flags + ["--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "metrics.json").exists()  # no work started


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    assert main(SMALL + ["--rounds", "1", "--output-dir", str(tmp_path)]) == 0
    assert main(SMALL + ["--rounds", "2", "--lr", "0.5", "--resume", "--output-dir", str(tmp_path)]) == 2
    assert "different settings (lr)" in capsys.readouterr().err


def test_dispatch_and_ops_path_flags(tmp_path, capsys):
    """--ops-path forces paths (named in the log line and metrics.json); bad values are one line before any work."""
    import json

    from hyperfl_fast.train import main

    flags = ["--dataset", "synthetic", "--clients", "2", "--local-size", "20", "--test-size", "10", "--local-epochs",
             "1", "--batch-size", "10", "--rounds", "1", "--device", "cpu"]
    assert main(flags + ["--ops-path", "conv=reference", "--output-dir", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "ops: forced conv=reference; precision fp32" in out and "ops: " in out.splitlines()[-2]
    calls = json.loads((tmp_path / "a" / "metrics.json").read_text())["ops"]["batched_conv2d_leaky_pool"]["calls"]
    assert set(calls) == {"reference"} and calls["reference"] > 0
    assert main(flags + ["--ops-path", "conv=fast", "--output-dir", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err == "error: --ops-path: conv='fast'; a path is one of reference, torch, triton\n"
    assert main(flags + ["--dispatch", "fastest", "--output-dir", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == "error: --dispatch must be one of measured, static, got 'fastest'\n"
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
