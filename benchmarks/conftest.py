"""Shared benchmark helpers: device, synchronised timing, measured copy bandwidth, paths.

GPU work is timed with a synchronise after each call (warm-up outside the
timing); every result records device and versions in its extra info.
"""
import platform
import time

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N_CLIENTS = 20


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def device_name() -> str:
    return torch.cuda.get_device_name() if DEVICE.type == "cuda" else f"cpu ({platform.processor() or 'x86_64'})"


def skip_unless_available(path: str):
    if path == "triton" and DEVICE.type != "cuda":
        pytest.skip("the triton path is benchmarked on a GPU only (the interpreter is not a measurement)")


def timed(benchmark, fn, rounds: int = 5, **extra):
    """Benchmark ``fn`` (synchronised), recording device, versions and ``extra`` figures."""
    def call():
        fn()
        sync()

    benchmark.extra_info.update(device=device_name(), torch=torch.__version__, **extra)
    try:
        import triton
        benchmark.extra_info["triton"] = triton.__version__
    except ImportError:
        pass
    benchmark.pedantic(call, rounds=rounds, warmup_rounds=1 if rounds > 1 else 0, iterations=1)
    return benchmark.stats.stats.median


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Measured device copy bandwidth in GB/s (read + write bytes of a 256 MiB copy)."""
    src = torch.empty(64 * 2**20, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def report_bandwidth(benchmark, median_s: float, nbytes: int, copy_bw: float):
    achieved = nbytes / median_s / 1e9
    benchmark.extra_info.update(gb_per_s=round(achieved, 1), copy_gb_per_s=round(copy_bw, 1),
                                fraction_of_copy=round(achieved / copy_bw, 3))
