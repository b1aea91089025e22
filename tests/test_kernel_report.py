"""Every kernel x autotune configuration x precision, compiled for sm_90 and sm_80 at the workload's real shapes
(no GPU needed): each compiles, spills nothing, and fits the architecture's shared memory per block.

This is ``python -m hyperfl_fast.kernels.report`` (a few minutes of CPU), run in a subprocess started when the
session is collected (conftest.py), so it overlaps the other tests: the test session interprets the kernels
(TRITON_INTERPRET=1), and interpreted kernels cannot be compiled.
"""
import json

from hyperfl_fast.config import Config
from hyperfl_fast.kernels import report, workloads
from hyperfl_fast.models import cnn_spec

from conftest import kernel_report_rows


def test_the_workload_shapes_are_the_papers_models():
    cfg = Config()
    assert (workloads.N, workloads.B, workloads.E, workloads.H) == (cfg.clients, cfg.batch_size, cfg.embed_dim,
                                                                    cfg.hidden_dim)
    assert workloads.SLOTS == 12 * cfg.local_epochs  # 600 samples per client in batches of 50, 5 epochs
    for name, spec in (("fmnist", cnn_spec(1, 10)), ("cifar", cnn_spec(3, 10))):
        channels, size, convs, flat = workloads.MODELS[name]
        assert (channels, size, flat) == (spec.in_channels, spec.image_size, spec.flat_features)
        assert convs == tuple((c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in spec.convs)
        assert workloads.num_params(name) == spec.num_feature_params


def test_every_kernel_configuration_compiles_without_spills_for_sm90_and_sm80():
    returncode, rows, stderr = kernel_report_rows()  # started at collection (conftest.py), on one core
    failing = [r for r in rows if not r["ok"]]
    assert returncode == 0 and rows and not failing, json.dumps(failing, indent=1)[:4000] + stderr[-2000:]
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["config"].rsplit(",", 1)[-1] for r in rows if r["kernel"].startswith("_conv")} == {"ieee", "tf32"}
    tf32_convs = [r for r in rows if r["kernel"].startswith("_conv") and r["config"].endswith("tf32")]
    assert all(r["tensor_cores"] for r in tf32_convs)  # the fast mode runs on tensor cores
    assert len({r["kernel"] for r in rows}) >= 16  # every kernel of the package (the report adds a failing row
    # for one that no workload launches)


def test_the_cli_prints_a_table_or_json_and_fails_on_a_bad_row(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    good = report.Row(90, "fmnist-cnn", "_conv_pool_fwd_kernel", "BLOCK_M=128,ieee", registers=128, warps=8)
    bad = report.Row(80, "fmnist-cnn", "_conv_dw_kernel", "BLOCK_M=64,tf32", registers=255, spill_bytes=64)
    monkeypatch.setattr(report, "report", lambda *a, **k: [good])
    assert report.main(["--arch", "90"]) == 0
    assert "| sm_90 | fmnist-cnn | _conv_pool_fwd_kernel | BLOCK_M=128,ieee | 128 | 0 |" in capsys.readouterr().out
    monkeypatch.setattr(report, "report", lambda *a, **k: [good, bad])
    assert report.main(["--json"]) == 1
    assert '"spill_bytes": 64' in capsys.readouterr().out


def test_the_report_refuses_the_interpreter(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert report.main([]) == 2
    assert "unset TRITON_INTERPRET" in capsys.readouterr().err
