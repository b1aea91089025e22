"""The ops' dispatch: overrides, the static table, and the measured choice (with a fake timer, on the CPU).

Measurement normally happens on CUDA only; these tests widen ``accelerated`` to the CPU and replace the CUDA
event timer with a table of seconds per candidate, so the selection logic (fastest *correct* candidate,
cached per device on disk, never during graph capture) is checked here and the timing itself on a GPU.
"""
import json

import pytest
import torch

from hyperfl_fast import ops
from hyperfl_fast.ops import dispatch
from hyperfl_fast.ops.dispatch import Dispatcher, Op

from conftest import DEVICE


class FakeTimer(dispatch.Timer):
    def __init__(self, seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, label, fn):
        fn()
        self.calls.append(label)
        return self.seconds[label]


def scale(x, k):
    return x * k


def toy_op(name="toy", torch_impl=None, triton_impl=None, mutates=()):
    """An op whose reference, torch and Triton paths are given functions (default: all correct)."""
    def reference(x, k):
        return torch.stack([row * k for row in x])
    return Op(name, reference, torch_impl or scale, triton_impl or scale, mutates)


@pytest.fixture
def measuring(tmp_path, monkeypatch):
    """A fresh dispatcher that measures on the CPU, caching in tmp_path.  The toy ops' "triton" paths are plain
    Python, so the CPU may take them on a GPU machine too (where the interpreter is off)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    d = Dispatcher()
    d.accelerated = lambda device: True
    d.cache_dir = tmp_path
    d.set_overrides("")
    return d


def test_measured_dispatch_keeps_the_fastest_correct_path_and_caches_it(measuring, tmp_path):
    op = measuring.register(toy_op())
    measuring.timer = FakeTimer({"torch": 2e-3, "triton": 1e-3})
    x = torch.randn(4, 3)
    torch.testing.assert_close(measuring.call(op, None, (x, 2)), x * 2)
    assert measuring.timer.calls == ["torch", "triton"]
    measuring.call(op, None, (x, 2))  # the same key: no second measurement
    assert measuring.timer.calls == ["torch", "triton"]
    assert measuring.stats()["toy"]["calls"] == {"triton": 2}
    assert "toy triton x2 (1 ms)" == measuring.describe()
    cached = json.loads(next(tmp_path.glob("dispatch-*.json")).read_text())
    (key, choice), = cached["choices"].items()
    assert key.startswith("toy|float32[4, 3],2|") and choice["path"] == "triton"
    assert choice["seconds"] == {"torch": 2e-3, "triton": 1e-3}

    fresh = Dispatcher()  # a later process on the same machine reads the cache and measures nothing
    fresh.accelerated, fresh.cache_dir, fresh.timer = (lambda d: True), tmp_path, FakeTimer({})
    fresh.set_overrides("")
    assert fresh.resolve(fresh.register(toy_op()), None, (x, 2)) == "triton" and fresh.timer.calls == []


def test_a_new_shape_is_measured_again(measuring):
    op = measuring.register(toy_op())
    measuring.timer = FakeTimer({"torch": 1e-3, "triton": 2e-3})
    assert measuring.resolve(op, None, (torch.randn(4, 3), 2)) == "torch"
    measuring.timer.seconds = {"torch": 3e-3, "triton": 2e-3}
    assert measuring.resolve(op, None, (torch.randn(5, 3), 2)) == "triton"
    assert measuring.resolve(op, None, (torch.randn(4, 3), 2)) == "torch"


def test_a_wrong_or_failing_candidate_is_never_chosen(measuring):
    wrong = measuring.register(toy_op("wrong", triton_impl=lambda x, k: x * k + 1e-2))
    measuring.timer = FakeTimer({"torch": 5e-3, "triton": 1e-3})
    assert measuring.resolve(wrong, None, (torch.randn(4, 3), 2)) == "torch"
    (choice,) = measuring.choices.values()
    assert choice.rejected["triton"].startswith("relative error") and "triton" not in choice.seconds

    def broken(x, k):
        raise RuntimeError("out of resources: shared memory")
    failing = measuring.register(toy_op("failing", triton_impl=broken))
    x = torch.randn(4, 3)
    assert measuring.resolve(failing, None, (x, 2)) == "torch"
    rejected = measuring.choices[dispatch.call_key(failing, (x, 2))].rejected
    assert rejected == {"triton": "RuntimeError: out of resources: shared memory"}


def test_gradients_are_compared_too(measuring):
    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, k):
            ctx.k = k
            return x * k

        @staticmethod
        def backward(ctx, g):
            return g * (ctx.k + 1), None

    op = measuring.register(toy_op("grads", triton_impl=WrongBackward.apply))
    measuring.timer = FakeTimer({"torch": 5e-3, "triton": 1e-3})
    assert measuring.resolve(op, None, (torch.randn(4, 3, requires_grad=True), 2)) == "torch"
    assert measuring.resolve(op, None, (torch.randn(4, 3), 2)) == "triton"  # no gradient asked: forward only


def test_an_op_measured_on_random_inputs_is_checked_and_timed_on_them_and_runs_on_its_own(measuring):
    """``measure_on``: the check sees random data of the call's shapes and flags (max-pool ties on real images
    would reject correct paths); the call itself still computes on its own input."""
    seen = []

    def spy(x, k):
        seen.append(x.detach().clone())
        return x * k
    op = measuring.register(Op("spy", lambda x, k: torch.stack([r * k for r in x]), spy, spy,
                               measure_on=dispatch.random_at(0)))
    measuring.timer = FakeTimer({"torch": 2e-3, "triton": 1e-3})
    x = torch.zeros(4, 3, requires_grad=True)  # all ties: the case the random inputs are for
    out = measuring.call(op, None, (x, 2))
    torch.testing.assert_close(out, x * 2)
    assert out.requires_grad and len(seen) == 5  # torch and triton: checked, then timed; then the call itself
    for measured in seen[:4]:
        assert measured.shape == x.shape and measured.std() > 0.5 and torch.equal(measured, seen[0])
    assert torch.equal(seen[4], x.detach())


def test_falling_back_to_the_reference_path_is_a_warning_naming_the_op(measuring):
    op = measuring.register(toy_op("bad", torch_impl=lambda x, k: x * k + 1.0, triton_impl=lambda x, k: x * k - 1.0))
    measuring.timer = FakeTimer({"torch": 1e-3, "triton": 1e-3})
    with pytest.warns(RuntimeWarning, match=r"dispatch: bad runs its slow reference path .*torch relative error"):
        assert measuring.resolve(op, None, (torch.randn(4, 3), 2)) == "reference"


def test_measuring_a_mutating_op_leaves_its_inputs_alone(measuring):
    def add_(x, k):
        x.add_(k)

    def reference(x, k):
        for row in x:
            row.add_(k)
    op = measuring.register(Op("inplace", reference, add_, add_, mutates=(0,)))
    measuring.timer = FakeTimer({"torch": 1e-3, "triton": 2e-3})
    x = torch.randn(4, 3)
    before = x.clone()
    measuring.call(op, None, (x, 1.5))
    torch.testing.assert_close(x, before + 1.5)  # the measurement worked on copies; the call itself on x


def test_no_measurement_while_a_cuda_graph_is_captured(measuring, monkeypatch):
    op = measuring.register(toy_op("batched_linear"))
    measuring.timer = FakeTimer({})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert measuring.resolve(op, None, (torch.randn(4, 3), 2)) == dispatch.STATIC_CUDA["batched_linear"]
    assert measuring.timer.calls == [] and measuring.choices == {}


def test_the_precision_is_part_of_the_key(measuring):
    op = measuring.register(toy_op())
    measuring.timer = FakeTimer({"torch": 1e-3, "triton": 2e-3})
    x = torch.randn(4, 3)
    keys = set()
    for mode in ("fp32", "tf32"):
        ops.set_precision(mode)
        measuring.resolve(op, None, (x, 2))
        keys.add(dispatch.call_key(op, (x, 2)))
    ops.set_precision("fp32")
    assert len(keys) == 2 and len(measuring.choices) == 2


def test_static_mode_overrides_and_explicit_paths(measuring, monkeypatch):
    op = measuring.register(toy_op("batched_conv2d_leaky_pool"))
    op.short = "conv"
    measuring.timer = FakeTimer({})
    x = torch.randn(2, 2)
    measuring.set_mode("static")
    assert measuring.resolve(op, None, (x, 2)) == dispatch.STATIC_CUDA["batched_conv2d_leaky_pool"]
    measuring.set_overrides(None)  # back to the environment variable
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert measuring.resolve(op, None, (x, 2)) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "conv=torch")
    assert measuring.resolve(op, None, (x, 2)) == "torch"
    assert measuring.resolve(op, "reference", (x, 2)) == "reference"  # the argument wins
    measuring.set_overrides("batched_conv2d_leaky_pool=reference")  # --ops-path wins over the variable
    assert measuring.resolve(op, None, (x, 2)) == "reference"
    assert measuring.timer.calls == []


def test_the_cpu_takes_torch_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    d = Dispatcher()
    op = d.register(toy_op())
    assert d.resolve(op, None, (torch.randn(2), 1)) == "torch"
    assert ops.DISPATCH.resolve(ops.DISPATCH.ops["batched_linear"], None, (torch.randn(1, 1, 1),)) == "torch"


@pytest.mark.parametrize("spec,message", [
    ("cuda", "HYPERFL_OPS_PATH must be one of reference, torch, triton, or op=path pairs such as conv=triton, "
             "got 'cuda'"),
    ("conv=gpu", "HYPERFL_OPS_PATH: conv='gpu'; a path is one of reference, torch, triton"),
    ("attention=triton", "HYPERFL_OPS_PATH: unknown op 'attention'; the ops are conv"),
])
def test_bad_overrides_are_one_line_errors(spec, message, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, spec)
    d = Dispatcher()
    d.register(toy_op("batched_conv2d_leaky_pool")).short = "conv"
    with pytest.raises(ValueError) as err:
        d.check_environment()
    assert str(err.value).startswith(message)


def test_bad_mode_and_triton_without_gpu(monkeypatch):
    monkeypatch.setenv(dispatch.MODE_ENV, "fastest")
    with pytest.raises(ValueError, match="HYPERFL_DISPATCH must be one of measured, static, got 'fastest'"):
        Dispatcher().check_environment()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    d = Dispatcher()
    with pytest.raises(ValueError, match="the triton path needs CUDA tensors"):
        d.resolve(d.register(toy_op()), "triton", (torch.randn(2), 1))


def test_the_cache_is_per_device_and_versions(tmp_path):
    path = dispatch.cache_path(torch.device("cpu"), tmp_path)
    assert path.parent == tmp_path and path.name.startswith("dispatch-")
    assert dispatch.device_description(torch.device("cpu")).startswith("cpu|torch ")


def test_an_unreadable_cache_is_measured_again(measuring, tmp_path):
    op = measuring.register(toy_op())
    dispatch.cache_path(torch.device("cpu"), tmp_path).write_text("{not json")
    measuring.timer = FakeTimer({"torch": 1e-3, "triton": 2e-3})
    with pytest.warns(RuntimeWarning, match="ignoring an unreadable dispatch cache"):
        assert measuring.resolve(op, None, (torch.randn(2, 2), 1)) == "torch"


def test_real_ops_are_measured_against_their_reference(measuring):
    """The package's conv op, measured on this machine's paths (Triton interpreted): both correct, the faster wins."""
    from hyperfl_fast.ops.conv import OP

    measuring.register(OP)
    measuring.timer = FakeTimer({"torch": 3e-3, "triton": 1e-3})
    x, w, b = torch.randn(2, 2, 3, 8, 8, device=DEVICE), torch.randn(2, 4, 3, 3, 3, device=DEVICE), \
        torch.randn(2, 4, device=DEVICE)
    w.requires_grad_()
    assert measuring.resolve(OP, None, (x, w, b, 1)) == "triton"
    (choice,) = measuring.choices.values()
    assert choice.rejected == {} and set(choice.seconds) == {"torch", "triton"}


def test_the_factored_heads_are_measured_at_their_full_span(measuring):
    """Every step of a round has another span; all of them share one measurement, taken at the full span."""
    from hyperfl_fast.ops.factored import RMATVEC

    measuring.register(RMATVEC)
    measuring.timer = FakeTimer({"torch": 1e-3, "triton": 2e-3})
    n, p, h, s = 2, 40, 8, 5
    args = [torch.randn(n, p, device=DEVICE), torch.randn(p, h, device=DEVICE), torch.randn(n, s, p, device=DEVICE),
            torch.randn(n, s, h, device=DEVICE), torch.rand(n, device=DEVICE), torch.randn(n, s, device=DEVICE)]
    for span in range(s + 1):
        assert measuring.resolve(RMATVEC, None, (*args, span)) == "torch"
    (key,) = measuring.choices
    assert key.endswith(f",{s}|fp32") and measuring.timer.calls == ["torch", "triton"]


def test_a_path_the_op_refuses_is_no_candidate_and_the_fallback_is_never_a_rejected_one(measuring):
    """The op's own limits (``check``) apply to measurement; if every candidate is out, a path that was not."""
    op = measuring.register(toy_op("limits", torch_impl=lambda x, k: x * k + 1.0))  # torch: wrong here

    def check(path):
        if path == "triton":
            raise ValueError("limits: the triton path supports hidden size <= 256")
    measuring.timer = FakeTimer({"torch": 1e-3, "triton": 1e-4})
    x = torch.randn(4, 3)
    assert measuring.resolve(op, None, (x, 2), check=check) == "reference"
    rejected = measuring.choices[dispatch.call_key(op, (x, 2))].rejected
    assert rejected["triton"].startswith("ValueError: limits") and rejected["torch"].startswith("relative error")
    assert measuring.timer.calls == []
