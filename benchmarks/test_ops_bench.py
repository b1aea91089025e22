"""Fused ops side by side: weight generation, fused head update, whole target-CNN stack.

Paths: ``reference`` (per-client loop), ``torch`` (vectorised), ``vmap``
(``torch.func.vmap`` over ``functional_call``), ``triton`` (GPU only).
N = 20 clients; the CNN stack runs B = 50 samples per client, forward + backward.
"""
import math

import pytest
import torch
from torch.func import functional_call, vmap

from hyperfl_fast import ops
from hyperfl_fast.models import HyperNetwork, TargetCNN, cnn_spec, extract_features_batched, split_theta

from conftest import DEVICE, N_CLIENTS, report_bandwidth, skip_unless_available, timed

MODELS = {"fmnist": cnn_spec(1, 10), "cifar": cnn_spec(3, 10)}
E, H = 64, 128


def hypernet_tensors(p: int, shared: bool):
    lead = () if shared else (N_CLIENTS,)
    return (torch.randn(N_CLIENTS, E, device=DEVICE), torch.randn(*lead, H, E, device=DEVICE) / 8,
            torch.randn(*lead, H, device=DEVICE), torch.randn(*lead, p, H, device=DEVICE) / 11,
            torch.randn(*lead, p, device=DEVICE))


def vmap_generate(v, fc_w, fc_b, head_w, head_b):
    hn = HyperNetwork(E, H, head_w.shape[-2]).to("meta")
    params = {"fc.weight": fc_w, "fc.bias": fc_b, "heads.weight": head_w, "heads.bias": head_b}
    in_dims = ({k: None if t.dim() == (2 if k.endswith("weight") else 1) else 0 for k, t in params.items()}, 0)
    return vmap(lambda prm, x: functional_call(hn, prm, (x,)), in_dims=in_dims)(params, v)


@pytest.mark.benchmark(group="generate")
@pytest.mark.parametrize("path", ["reference", "torch", "vmap", "triton"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-client"])
@pytest.mark.parametrize("model", list(MODELS))
def test_generate(benchmark, copy_bandwidth, model, shared, path):
    """The per-client Triton GEMV is autotuned over its block configurations (kernels.generate)."""
    skip_unless_available(path)
    p = MODELS[model].num_feature_params
    args = hypernet_tensors(p, shared)
    fn = (lambda: vmap_generate(*args)) if path == "vmap" else (lambda: ops.generate_weights(*args, path=path))
    with torch.no_grad():
        median = timed(benchmark, fn)
    head_bytes = p * H * 4 * (1 if shared else N_CLIENTS)
    report_bandwidth(benchmark, median, head_bytes + N_CLIENTS * p * 4, copy_bandwidth)


@pytest.mark.benchmark(group="head-update")
@pytest.mark.parametrize("path", ["reference", "torch", "triton"])
def test_fused_head_update(benchmark, copy_bandwidth, path):
    skip_unless_available(path)
    p = MODELS["fmnist"].num_feature_params
    head_w = torch.randn(N_CLIENTS, p, H, device=DEVICE) / 11
    head_b, w_buf = torch.randn(N_CLIENTS, p, device=DEVICE), torch.zeros_like(head_w)
    b_buf, d_theta = torch.zeros_like(head_b), torch.randn(N_CLIENTS, p, device=DEVICE) * 1e-3
    hidden, coef = torch.randn(N_CLIENTS, H, device=DEVICE).relu(), torch.rand(N_CLIENTS, device=DEVICE)
    median = timed(benchmark, lambda: ops.fused_head_sgd_step(head_w, head_b, w_buf, b_buf, d_theta, hidden, coef,
                                                              0.02, 0.5, 5e-4, path=path), rounds=3)
    report_bandwidth(benchmark, median, 4 * head_w.numel() * 4, copy_bandwidth)  # W, buf: read + write once


def conv_stack_flops(spec, batch: int) -> float:
    """Forward multiply-adds x 2 of the feature extractor for N clients; fwd+bwd taken as 3x forward."""
    flops, size = 0, spec.image_size
    for conv in spec.convs:
        out = size + 2 * conv.padding - conv.kernel_size + 1
        flops += 2 * conv.out_channels * out * out * conv.in_channels * conv.kernel_size ** 2
        size = out // 2
    flops += 2 * spec.flat_features * spec.hidden
    return 3 * flops * batch * N_CLIENTS


def stack_vmap(x, theta, spec):
    cnn = TargetCNN(spec).to("meta")
    feature_names = [name for name, _ in spec.feature_shapes()]

    def one(prm, xi):
        h = xi
        for i in range(1, len(spec.convs) + 1):
            h = cnn.pool(cnn.act(functional_call(getattr(cnn, f"conv{i}"), {"weight": prm[f"conv{i}.weight"],
                                                                           "bias": prm[f"conv{i}.bias"]}, (h,))))
        return cnn.act(functional_call(cnn.fc1, {"weight": prm["fc1.weight"], "bias": prm["fc1.bias"]},
                                       (h.flatten(1),)))

    params = split_theta(theta, spec)
    return vmap(one)({k: params[k] for k in feature_names}, x)


@pytest.fixture
def precision(request):
    """Run a benchmark under one precision mode (tf32 only where there are tensor cores), then restore fp32."""
    mode = request.param
    if mode == "tf32" and DEVICE.type != "cuda":
        pytest.skip("tf32 is a GPU mode")
    ops.set_precision(mode)
    yield mode
    ops.set_precision("fp32")


@pytest.mark.benchmark(group="cnn-stack")
@pytest.mark.parametrize("precision", ["fp32", "tf32"], indirect=True)
@pytest.mark.parametrize("path", ["reference", "torch", "vmap", "triton"])
@pytest.mark.parametrize("model", list(MODELS))
def test_cnn_stack_forward_backward(benchmark, model, path, precision):
    skip_unless_available(path)
    if precision == "tf32" and path in ("reference", "vmap"):
        pytest.skip("tf32 is compared on the two fast paths only")
    spec, batch = MODELS[model], 50
    theta = (torch.randn(N_CLIENTS, spec.num_feature_params, device=DEVICE) * 0.05).requires_grad_()
    x = torch.randn(N_CLIENTS, batch, spec.in_channels, spec.image_size, spec.image_size, device=DEVICE)
    grad_out = torch.randn(N_CLIENTS, batch, spec.hidden, device=DEVICE)

    def step():
        feats = stack_vmap(x, theta, spec) if path == "vmap" else \
            extract_features_batched(x, split_theta(theta, spec), spec, path=path)
        (d_theta,) = torch.autograd.grad(feats, theta, grad_out)
        return d_theta

    median = timed(benchmark, step, rounds=5, precision=precision)
    benchmark.extra_info["gflop_per_s"] = round(conv_stack_flops(spec, batch) / median / 1e9, 1)
    assert math.isfinite(median)


CONV_LAYERS = [(model, i) for model, spec in MODELS.items() for i in range(len(spec.convs))]


@pytest.mark.benchmark(group="conv-layer")
@pytest.mark.parametrize("phase", ["forward", "backward"])
@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("model,layer", CONV_LAYERS, ids=[f"{m}-conv{i + 1}" for m, i in CONV_LAYERS])
def test_conv_layer(benchmark, model, layer, path, phase):
    """Where the CNN stack's time goes: each fused conv layer, forward and backward (dx and dW) apart."""
    skip_unless_available(path)
    spec, batch = MODELS[model], 50
    conv, size = spec.convs[layer], spec.image_size
    for previous in spec.convs[:layer]:
        size = (size + 2 * previous.padding - previous.kernel_size + 1) // 2
    k = conv.kernel_size
    x = torch.randn(N_CLIENTS, batch, conv.in_channels, size, size, device=DEVICE, requires_grad=layer > 0)
    w = (torch.randn(N_CLIENTS, conv.out_channels, conv.in_channels, k, k, device=DEVICE) * 0.1).requires_grad_()
    b = torch.randn(N_CLIENTS, conv.out_channels, device=DEVICE, requires_grad=True)
    out = ops.batched_conv2d_leaky_pool(x, w, b, conv.padding, path=path)
    grad_out = torch.randn_like(out)
    inputs = [t for t in (x, w, b) if t.requires_grad]
    if phase == "forward":
        with torch.no_grad():
            median = timed(benchmark, lambda: ops.batched_conv2d_leaky_pool(x, w, b, conv.padding, path=path))
    else:
        median = timed(benchmark, lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True))
    out_pixels = (size + 2 * conv.padding - k + 1) ** 2
    flops = 2 * N_CLIENTS * batch * out_pixels * conv.out_channels * conv.in_channels * k * k
    passes = 1 if phase == "forward" else (2 if x.requires_grad else 1)  # backward: dW, plus dx past layer 1
    benchmark.extra_info["gflop_per_s"] = round(passes * flops / median / 1e9, 1)


@pytest.mark.benchmark(group="factored-heads")
@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("op", ["generate", "rmatvec"])
def test_factored_heads(benchmark, copy_bandwidth, op, path):
    """The hypernetwork phase's generation and its transpose at the round's full span (60 slots, fmnist): both
    stream the rank-one factors u (N, 60, P) once, 556 MB, which sets their floor."""
    skip_unless_available(path)
    p, s = MODELS["fmnist"].num_feature_params, 60
    w0, u, v = torch.randn(p, H, device=DEVICE) / 11, torch.randn(N_CLIENTS, s, p, device=DEVICE) / 100, \
        torch.randn(N_CLIENTS, s, H, device=DEVICE)
    alpha, beta = torch.rand(N_CLIENTS, device=DEVICE), torch.randn(N_CLIENTS, s, device=DEVICE)
    emb, fc_w, fc_b = torch.randn(N_CLIENTS, E, device=DEVICE), torch.randn(N_CLIENTS, H, E, device=DEVICE) / 8, \
        torch.randn(N_CLIENTS, H, device=DEVICE)
    bias = torch.randn(N_CLIENTS, p, device=DEVICE)
    if op == "generate":
        fn = lambda: ops.factored_generate(emb, fc_w, fc_b, bias, w0, u, v, alpha, beta, s, path=path)  # noqa: E731
    else:
        fn = lambda: ops.factored_rmatvec(bias, w0, u, v, alpha, beta, s, path=path)  # noqa: E731
    median = timed(benchmark, fn)
    report_bandwidth(benchmark, median, (u.numel() + w0.numel() + 2 * bias.numel()) * 4, copy_bandwidth)
