"""The GPU acceptance script's report writer and its refusal without a GPU (its measurements need one)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_acceptance", ROOT / "benchmarks" / "gpu_acceptance.py")
gpu_acceptance = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_acceptance)


def test_the_report_has_a_verdict_per_target(tmp_path):
    results = {
        "environment": {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "python": "3.11"},
        "skipped": ["tests (out of time)"],
        "cnn": {"fmnist fp32": {"torch": 3.0, "triton": 1.5, "speedup": 2.0},
                "cifar fp32": {"torch": 4.0, "triton": 3.2, "speedup": 1.25}},
        "round_ms": {"static": 60.0, "measured": 38.0},
        "profile": {"kernels": 1800, "gpu_busy_ms": 33.0, "package_share": 0.7, "host_calls": {}, "ops": "conv",
                    "table": "..."},
        "train": {"returncode": 0, "wall_s": 16.5, "round_s_median": 0.05, "final_local_acc": 88.1},
    }
    gpu_acceptance.write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| one paper-scale round (measured dispatch) | <= 40 ms | 38.0 ms | PASS |" in report
    assert "| 200 rounds end to end | < 15 s | 16.5 s | FAIL |" in report
    assert "| Triton CNN stack vs cuDNN, fp32 | >= 1.5x | 2.00x, 1.25x | FAIL |" in report
    assert "| measured dispatch vs static table | not slower | 38.0 vs 60.0 ms | PASS |" in report
    assert "| GPU tests | all pass | - | not run |" in report and "Not run: tests (out of time)" in report


def test_without_a_gpu_it_says_so():
    if torch.cuda.is_available():
        return  # measured on the GPU itself by benchmarks/gpu_session.sh
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_acceptance.py"), "--out", "/tmp/gpu-x"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and out.stderr.strip() == "error: no CUDA device: this script measures the GPU targets"
