"""Shared fixtures: small synthetic federations for fast tests.

Without a GPU, Triton kernels run on the CPU through Triton's interpreter; it
must be switched on before triton is first imported, hence here.
"""
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the triton-path tests run
# the DP methods need the dp extra (opacus): `make test` installs it; a bare GPU image may not have it
NEEDS_OPACUS = pytest.mark.skipif(importlib.util.find_spec("opacus") is None,
                                  reason="opacus (hyperfl_fast[dp]) is not installed; `make test` installs it")

from hyperfl_fast.config import Config
from hyperfl_fast.data import make_synthetic
from hyperfl_fast.federation import build_clients
from hyperfl_fast.partition import partition


@pytest.fixture(autouse=True, scope="session")
def node_state_dir(tmp_path_factory):
    """Flower ClientApp code run in-process writes its private state under $HYPERFL_NODE_STATE_DIR: a temporary
    folder, never the user's home."""
    os.environ["HYPERFL_NODE_STATE_DIR"] = str(tmp_path_factory.mktemp("node-state"))
    yield
    os.environ.pop("HYPERFL_NODE_STATE_DIR", None)


def small_federation(in_channels=1, clients=4, local_size=60, test_size=40, seed=0, device=torch.device("cpu")):
    """A synthetic dataset split over a few clients, as ClientData on ``device``."""
    data = make_synthetic(in_channels)
    splits = partition(data.train_labels.numpy(), data.test_labels.numpy(), data.num_classes, data.class_groups,
                       clients, local_size, test_size, 0.2, seed=seed)
    return data, build_clients(data, splits, device)


def tiny_model(in_channels=1, clients=2, local_size=6, test_size=4, size=12, device=torch.device("cpu")):
    """The paper's CNN structure (two convs, or three for 3 channels; fc1; classifier) at a tiny size, with a
    synthetic federation cropped to it: what the Triton interpreter can run through a whole round quickly."""
    from hyperfl_fast.models import CNNSpec, ConvSpec

    convs = (ConvSpec(in_channels, 4, 3, 0), ConvSpec(4, 8, 3, 1)) + ((ConvSpec(8, 8, 3, 1),) if in_channels == 3
                                                                      else ())
    spec = CNNSpec(in_channels, size, convs, 16, 10)
    _, federation = small_federation(in_channels, clients=clients, local_size=local_size, test_size=test_size,
                                     device=device)
    for c in federation:
        c.train_x, c.test_x = c.train_x[..., :size, :size].contiguous(), c.test_x[..., :size, :size].contiguous()
    return spec, federation


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (engine comparisons to 1e-9), then restore it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def tiny_config():
    return Config(dataset="synthetic", clients=4, local_epochs=1, batch_size=20, local_size=60, test_size=40,
                  rounds=2, device="cpu")


@pytest.fixture
def lpips_weight_files(tmp_path):
    """Random stand-ins for the two LPIPS weight files a user provides: (alexnet.pth, lin.pth)."""
    from torchvision.models import alexnet

    alexnet_path, linear_path = tmp_path / "alexnet.pth", tmp_path / "lin.pth"
    torch.save(alexnet(weights=None).state_dict(), alexnet_path)
    channels = (64, 192, 384, 256, 256)  # AlexNet's five ReLU taps
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(channels)}, linear_path)
    return alexnet_path, linear_path


# --------------------------------------------------------------------------- the kernel report, started early
# Compiling every kernel configuration for two GPU architectures takes minutes of CPU; started in the background
# as soon as the session knows it will be needed (on one core), it overlaps the tests that mostly wait (the
# Flower deployments), and tests/test_kernel_report.py collects its result.
_KERNEL_REPORT = {}


def pytest_collection_modifyitems(session, config, items):
    if any("test_kernel_report.py::test_every_kernel" in item.nodeid for item in items):
        import subprocess
        import sys
        import tempfile

        out = tempfile.NamedTemporaryFile(prefix="kernel-report-", suffix=".json", delete=False)
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # it compiles, not interprets
        _KERNEL_REPORT["process"] = subprocess.Popen(
            [sys.executable, "-m", "hyperfl_fast.kernels.report", "--json", "--workers", "1"], stdout=out,
            stderr=subprocess.PIPE, text=True, env=env)
        _KERNEL_REPORT["path"] = out.name


def kernel_report_rows(timeout: float = 1500) -> tuple[int, list, str]:
    """(exit status, rows, stderr) of the report started at collection."""
    import json

    proc = _KERNEL_REPORT["process"]
    _, stderr = proc.communicate(timeout=timeout)
    with open(_KERNEL_REPORT["path"]) as f:
        text = f.read()
    return proc.returncode, json.loads(text) if text.strip() else [], stderr


def pytest_sessionfinish(session, exitstatus):
    proc = _KERNEL_REPORT.get("process")
    if proc is not None and proc.poll() is None:  # the report test did not run to the end (deselected, -x, ^C)
        proc.kill()
        proc.wait()


@pytest.fixture
def server_identity(monkeypatch):
    """The task identity Flower's runtimes set in a ServerApp process (creating a Message needs it)."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):  # as the runtimes set them
        monkeypatch.setattr(TaskIdentity, name, value)
