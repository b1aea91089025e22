"""The ops' dispatch rule and their input validation at the API boundary."""
import pytest
import torch

from hyperfl_fast import ops

from conftest import DEVICE


def gen_args(n=2, e=4, h=8, p=10):
    return [torch.randn(n, e), torch.randn(h, e), torch.randn(h), torch.randn(p, h), torch.randn(p)]


@pytest.mark.parametrize("index,bad,message", [
    (0, torch.randn(4), "embeddings must be (N, E)"),
    (1, torch.randn(8, 5), "fc_weight must be (H, 4) or (2, H, 4)"),
    (2, torch.randn(7), "fc_bias must have shape (8,)"),
    (3, torch.randn(10, 9), "head_weight must be (P, 8) or (2, P, 8)"),
    (4, torch.randn(3, 10), "head_bias must have shape (10,)"),
    (3, torch.randn(3, 10, 8), "head_weight has 3 clients, embeddings 2"),
    (0, torch.ones(2, 4, dtype=torch.int64), "embeddings must be floating point"),
])
def test_generate_weights_rejects_bad_arguments(index, bad, message):
    args = gen_args()
    args[index] = bad
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ops.generate_weights(*args)


def test_triton_path_takes_float32_only():
    args = [t.double().to(DEVICE) for t in gen_args()]
    with pytest.raises(ValueError, match="the triton path takes float32, embeddings is torch.float64"):
        ops.generate_weights(*args, path="triton")


def test_conv_and_linear_validation():
    x = torch.randn(2, 3, 4, 10, 10)
    with pytest.raises(ValueError, match=r"weight must be \(2, Cout, 4, k, k\)"):
        ops.batched_conv2d_leaky_pool(x, torch.randn(2, 5, 3, 3, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 5\)"):
        ops.batched_conv2d_leaky_pool(x, torch.randn(2, 5, 4, 3, 3), torch.randn(5))
    with pytest.raises(ValueError, match="leaves nothing to pool"):
        ops.batched_conv2d_leaky_pool(x, torch.randn(2, 5, 4, 10, 10), torch.randn(2, 5))
    with pytest.raises(ValueError, match="padding must be a non-negative int"):
        ops.batched_conv2d_leaky_pool(x, torch.randn(2, 5, 4, 3, 3), torch.randn(2, 5), padding=-1)
    with pytest.raises(ValueError, match=r"x must be \(N, B, K\)"):
        ops.batched_linear(torch.randn(3, 4), torch.randn(3, 5, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"weight must be \(2, M, 4\)"):
        ops.batched_linear(torch.randn(2, 3, 4), torch.randn(2, 5, 3), torch.randn(2, 5))


def test_fused_head_step_validation():
    n, p, h = 2, 6, 4
    args = dict(head_weight=torch.randn(n, p, h), head_bias=torch.randn(n, p), weight_buf=torch.zeros(n, p, h),
                bias_buf=torch.zeros(n, p), d_theta=torch.randn(n, p), hidden=torch.randn(n, h),
                clip_coef=torch.ones(n), lr=0.1, momentum=0.5, weight_decay=0.0)
    with pytest.raises(ValueError, match=r"hidden must have shape \(2, 4\)"):
        ops.fused_head_sgd_step(**{**args, "hidden": torch.randn(n, h + 1)})
    with pytest.raises(ValueError, match="weight_buf is updated in place and must be contiguous"):
        ops.fused_head_sgd_step(**{**args, "weight_buf": torch.zeros(n, h, p).transpose(1, 2)})


@pytest.mark.parametrize("fc_shared,heads_shared", [(True, False), (False, True)])
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_generate_weights_mixes_shared_and_per_client_layers(fc_shared, heads_shared, path):
    """One layer shared, the other per client: every path equals the reference, forward and backward."""
    torch.manual_seed(7)
    n, e, h, p = 3, 5, 7, 37  # awkward sizes
    device = DEVICE if path == "triton" else torch.device("cpu")
    tensors = [torch.randn(n, e), torch.randn(*(() if fc_shared else (n,)), h, e),
               torch.randn(*(() if fc_shared else (n,)), h), torch.randn(*(() if heads_shared else (n,)), p, h),
               torch.randn(*(() if heads_shared else (n,)), p)]
    ref_in = [t.clone().requires_grad_() for t in tensors]
    fast_in = [t.clone().to(device).requires_grad_() for t in tensors]
    ref = ops.generate_weights(*ref_in, path="reference")
    fast = ops.generate_weights(*fast_in, path=path)
    torch.testing.assert_close(fast.cpu(), ref, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(ref)
    ref.backward(upstream)
    fast.backward(upstream.to(device))
    for a, b in zip(fast_in, ref_in):
        torch.testing.assert_close(a.grad.cpu(), b.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,message", [
    (lambda: ops.generate_weights(*[gen_args()[0].double()] + gen_args()[1:]),
     "generate_weights: fc_weight is torch.float32, embeddings torch.float64; pass one dtype"),
    (lambda: ops.generate_weights(gen_args()[0].numpy(), *gen_args()[1:]),
     "generate_weights: embeddings must be a torch.Tensor, got ndarray"),
    (lambda: ops.generate_weights(torch.randn(0, 4), *gen_args()[1:]),
     "generate_weights: embeddings must be (N, E) with N >= 1"),
    (lambda: ops.batched_conv2d_leaky_pool(torch.randn(2, 3, 4, 10, 10), torch.randn(2, 5, 4, 3, 3),
                                           torch.randn(2, 5), padding=True),
     "batched_conv2d_leaky_pool: padding must be a non-negative int, got True"),
    (lambda: ops.batched_conv2d_leaky_pool(torch.randn(2, 0, 4, 10, 10), torch.randn(2, 5, 4, 3, 3),
                                           torch.randn(2, 5)),
     "batched_conv2d_leaky_pool: x has no samples"),
    (lambda: ops.batched_linear(torch.randn(2, 0, 4), torch.randn(2, 5, 4), torch.randn(2, 5)),
     "batched_linear: x has no samples"),
    (lambda: ops.batched_linear(torch.randn(2, 3, 4).numpy(), torch.randn(2, 5, 4), torch.randn(2, 5)),
     "batched_linear: x must be a torch.Tensor"),
    (lambda: ops.head_grad_sq_norm(torch.randn(2, 6), torch.randn(3, 4)),
     "head_grad_sq_norm: d_theta must be (N, P) and hidden (N, H) with the same N"),
    (lambda: ops.head_grad_sq_norm([1.0, 2.0], torch.randn(2, 4)),
     "head_grad_sq_norm: d_theta must be a torch.Tensor, got list"),
    (lambda: ops.head_grad_sq_norm(torch.randn(2, 6), torch.randn(2, 4).double()),
     "head_grad_sq_norm: hidden is torch.float64, d_theta torch.float32"),
])
def test_bad_arguments_are_value_errors_naming_the_argument(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value).startswith(message)


@pytest.mark.parametrize("name,value", [("lr", "0.1"), ("momentum", float("nan")), ("weight_decay", None)])
def test_fused_head_step_rejects_bad_scalars(name, value):
    n, p, h = 2, 6, 4
    args = dict(head_weight=torch.randn(n, p, h), head_bias=torch.randn(n, p), weight_buf=torch.zeros(n, p, h),
                bias_buf=torch.zeros(n, p), d_theta=torch.randn(n, p), hidden=torch.randn(n, h),
                clip_coef=torch.ones(n), lr=0.1, momentum=0.5, weight_decay=0.0)
    with pytest.raises(ValueError, match=f"fused_head_sgd_step: {name} must be a finite number"):
        ops.fused_head_sgd_step(**{**args, name: value})


@pytest.fixture
def restore_precision():
    before = ops.get_precision()
    yield
    ops.set_precision(before)


def test_precision_policy_sets_torch_flags_and_triton_precision(restore_precision):
    from hyperfl_fast.ops.precision import triton_input_precision

    ops.set_precision("fp32")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert triton_input_precision() == "ieee"
    ops.set_precision("tf32")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert triton_input_precision() == "tf32" and ops.get_precision() == "tf32"
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, got 'bf16'"):
        ops.set_precision("bf16")


def test_fp32_is_in_force_once_the_package_computes():
    """The package turns cuDNN's TF32 default off as soon as any of its computing modules loads (its public names
    load on first use): the torch and reference paths compare in true float32."""
    import subprocess
    import sys

    code = ("import torch, hyperfl_fast; from hyperfl_fast import TargetCNN; "
            "print(torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_precision_environment_variable(monkeypatch, restore_precision):
    from hyperfl_fast.ops.precision import apply_environment

    monkeypatch.setenv("HYPERFL_PRECISION", "tf32")
    apply_environment()
    assert ops.get_precision() == "tf32"
    monkeypatch.setenv("HYPERFL_PRECISION", "fp16")
    with pytest.raises(ValueError, match="HYPERFL_PRECISION must be one of fp32, tf32, got 'fp16'"):
        apply_environment()


def test_triton_conv_under_tf32_is_within_the_documented_tolerance(restore_precision):
    """TF32 mode: relative error about 1e-3 against the fp32 reference (the interpreter may even be exact)."""
    torch.manual_seed(3)
    x, w, b = torch.randn(2, 3, 4, 11, 11), torch.randn(2, 8, 4, 3, 3), torch.randn(2, 8)
    ref = ops.batched_conv2d_leaky_pool(x, w, b, 1, path="reference")
    ops.set_precision("tf32")
    fast = ops.batched_conv2d_leaky_pool(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), 1, path="triton").cpu()
    assert ((fast - ref).abs().max() / ref.abs().max()).item() < 5e-3
