"""Every fused op against its per-client reference: forward and every gradient, several shapes.

The Triton path runs compiled on a GPU and through Triton's interpreter on the
CPU (see conftest.py).  Output buffers are poisoned (NaN / out-of-range) so an
element a kernel forgets to write fails the comparison.
"""
import math

import pytest
import torch

from hyperfl_fast import ops
from hyperfl_fast.ops import naive

from conftest import DEVICE

FAST_PATHS = ["torch", "triton"]


@pytest.fixture
def poisoned(monkeypatch):
    """torch.empty / empty_like return NaN-filled (float) or 127-filled (int) tensors."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(math.nan) if t.is_floating_point() else t.fill_(127)

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


def rand(*shape):
    return torch.randn(*shape, device=DEVICE)


def check_against_reference(fn, inputs, path, atol=1e-4, rtol=1e-4):
    """Run fn on the reference and on ``path`` with fresh leaf copies; compare output and all gradients."""
    results = {}
    grad_out = None
    for p in ("reference", path):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves, path=p)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)
        results[p] = (out.detach(), [leaf.grad for leaf in leaves])
    (want, want_grads), (got, got_grads) = results["reference"], results[path]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g is not None, f"no gradient for input {i}"
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"input {i}: {m}")


# --------------------------------------------------------------------------- weight generation

GEN_SHAPES = [(1, 8, 16, 37), (3, 64, 128, 1000), (5, 12, 32, 131)]  # (N, E, H, P): P off the block size


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("n,e,h,p", GEN_SHAPES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-client"])
def test_generate_weights(path, n, e, h, p, shared, poisoned):
    lead = () if shared else (n,)
    inputs = [rand(n, e), rand(*lead, h, e) / math.sqrt(e), rand(*lead, h), rand(*lead, p, h) / math.sqrt(h),
              rand(*lead, p)]
    check_against_reference(ops.generate_weights, inputs, path)


@pytest.mark.parametrize("config", range(5))
def test_every_per_client_gemv_block_config_is_correct(config, monkeypatch, poisoned):
    """Each block configuration the per-client GEMV may be autotuned over (``TUNE_PER_CLIENT``)."""
    from hyperfl_fast.kernels import generate

    assert len(generate.GEMV_CONFIGS) == 5
    monkeypatch.setattr(generate, "GEMV_CONFIGS", [generate.GEMV_CONFIGS[config]])  # the launcher's fixed one
    n, e, h, p = 3, 16, 128, 300  # 300 rows: off every block size
    inputs = [rand(n, e), rand(n, h, e) / 4, rand(n, h), rand(n, p, h) / math.sqrt(h), rand(n, p)]
    check_against_reference(ops.generate_weights, inputs, "triton")


# --------------------------------------------------------------------------- batched linear

@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("n,b,k,m", [(1, 1, 5, 3), (2, 50, 100, 17), (3, 7, 33, 70)])
@pytest.mark.parametrize("leaky", [False, True])
def test_batched_linear(path, n, b, k, m, leaky, poisoned):
    inputs = [rand(n, b, k), rand(n, m, k) / math.sqrt(k), rand(n, m)]
    check_against_reference(lambda *t, path: ops.batched_linear(*t, leaky=leaky, path=path), inputs, path)


# --------------------------------------------------------------------------- batched conv + pool

CONV_SHAPES = [  # (N, B, C, H, Cout, k, padding)
    (1, 1, 1, 12, 16, 5, 0),  # the 1-channel model's conv1 at a smaller image
    (2, 3, 16, 12, 32, 5, 1),  # its conv2 at full size
    (2, 2, 32, 6, 64, 3, 1),  # the 3-channel model's conv3
    (3, 2, 3, 9, 5, 3, 0),  # odd conv output (7x7): the last row/column is not pooled
]


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("n,b,c,h,cout,k,pad", CONV_SHAPES)
def test_batched_conv2d_leaky_pool(path, n, b, c, h, cout, k, pad, poisoned):
    inputs = [rand(n, b, c, h, h + 1), rand(n, cout, c, k, k) / math.sqrt(c * k * k), rand(n, cout)]
    check_against_reference(lambda *t, path: ops.batched_conv2d_leaky_pool(*t, padding=pad, path=path),
                            inputs, path)


@pytest.mark.parametrize("n", [3, 5])
def test_torch_conv_in_client_chunks_matches_reference(n, monkeypatch):
    """The CPU torch path splits clients into chunks when the output is large (here: forced small)."""
    from hyperfl_fast.ops import torch_ops
    monkeypatch.setattr(torch_ops, "CPU_CHUNK_BYTES", 2 * 2 * 16 * 10 * 10 * 4)  # two clients (B=2) per chunk
    inputs = [torch.randn(n, 2, 3, 10, 10), torch.randn(n, 16, 3, 3, 3) / 5, torch.randn(n, 16)]
    check_against_reference(lambda *t, path: ops.batched_conv2d_leaky_pool(*t, padding=1, path=path),
                            inputs, "torch")


# --------------------------------------------------------------------------- gradcheck of the references

def test_reference_paths_pass_gradcheck():
    def d(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    assert torch.autograd.gradcheck(naive.generate_weights, (d(2, 3), d(4, 3), d(4), d(5, 4), d(5)))
    assert torch.autograd.gradcheck(naive.generate_weights, (d(2, 3), d(2, 4, 3), d(2, 4), d(2, 5, 4), d(2, 5)))
    assert torch.autograd.gradcheck(lambda x, w, b: naive.linear(x, w, b, leaky=True), (d(2, 3, 4), d(2, 5, 4),
                                                                                         d(2, 5)))
    assert torch.autograd.gradcheck(lambda x, w, b: naive.conv2d_leaky_pool(x, w, b, 1),
                                    (d(2, 1, 2, 5, 5), d(2, 3, 2, 3, 3), d(2, 3)))


# --------------------------------------------------------------------------- fused head step

@pytest.mark.parametrize("path", ["reference"] + FAST_PATHS)
@pytest.mark.parametrize("n,e,h,p", [(1, 6, 16, 45), (3, 8, 32, 200)])
def test_fused_head_step_matches_clip_and_sgd(path, n, e, h, p):
    """Three consecutive steps (momentum carried) vs clip_grad_norm_ + torch.optim.SGD per client."""
    lr, momentum, wd, clip = 0.05, 0.5, 5e-4, 20.0
    torch.manual_seed(n * 100 + p)
    fc_w, fc_b, head_w, head_b = rand(n, h, e), rand(n, h), rand(n, p, h) / math.sqrt(h), rand(n, p)
    emb = rand(n, e)

    # reference: one ordinary module pair per client, autograd, clip_grad_norm_, SGD
    modules = []
    for i in range(n):
        fc, heads = torch.nn.Linear(e, h).to(DEVICE), torch.nn.Linear(h, p).to(DEVICE)
        with torch.no_grad():
            fc.weight.copy_(fc_w[i]), fc.bias.copy_(fc_b[i]), heads.weight.copy_(head_w[i]), heads.bias.copy_(head_b[i])
        params = [*fc.parameters(), *heads.parameters()]
        modules.append((fc, heads, params, torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)))

    # fused: heads updated by the op, first layer by a plain SGD on the same clipped gradient
    head_w, head_b = head_w.clone(), head_b.clone()
    w_buf, b_buf = torch.zeros_like(head_w), torch.zeros_like(head_b)
    fc_w, fc_b = fc_w.clone().requires_grad_(), fc_b.clone().requires_grad_()
    fc_opt = torch.optim.SGD([fc_w, fc_b], lr=lr, momentum=momentum, weight_decay=wd)

    for step in range(3):
        d_theta = rand(n, p) * torch.linspace(0.02, 3.0, n, device=DEVICE).unsqueeze(1)  # some clients clip
        clipped = 0
        for i, (fc, heads, params, opt) in enumerate(modules):
            opt.zero_grad()
            heads(torch.relu(fc(emb[i]))).backward(d_theta[i])
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            clipped += int(norm > clip)
            opt.step()

        fc_opt.zero_grad()
        hidden = torch.relu(torch.bmm(fc_w, emb.unsqueeze(2)).squeeze(2) + fc_b)  # (N, H)
        theta = torch.bmm(head_w, hidden.unsqueeze(2)).squeeze(2) + head_b
        theta.backward(d_theta)  # gives the first layer's gradient only (heads are plain tensors)
        sq_norm = ops.head_grad_sq_norm(d_theta, hidden.detach()) + fc_w.grad.pow(2).sum((1, 2)) \
            + fc_b.grad.pow(2).sum(1)
        coef = (clip / (sq_norm.sqrt() + 1e-6)).clamp(max=1.0)
        with torch.no_grad():
            fc_w.grad.mul_(coef.view(-1, 1, 1)), fc_b.grad.mul_(coef.view(-1, 1))
        fc_opt.step()
        ops.fused_head_sgd_step(head_w, head_b, w_buf, b_buf, d_theta, hidden.detach(), coef, lr, momentum, wd,
                                path=path)
        assert 0 < clipped < n or n == 1  # the test exercises both clipped and unclipped clients

    for i, (fc, heads, _, _) in enumerate(modules):
        torch.testing.assert_close(head_w[i], heads.weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(head_b[i], heads.bias.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fc_w[i].detach(), fc.weight.detach(), atol=1e-5, rtol=1e-4)


def test_head_grad_sq_norm_is_the_outer_product_norm():
    d_theta, hidden = rand(4, 30), rand(4, 7)
    explicit = torch.stack([torch.outer(d_theta[i], hidden[i]).pow(2).sum() + d_theta[i].pow(2).sum()
                            for i in range(4)])
    torch.testing.assert_close(ops.head_grad_sq_norm(d_theta, hidden), explicit)


def test_triton_conv_weight_gradient_split_is_exact_and_deterministic(monkeypatch):
    """dW sums each client's rows in several programs (forced here: 20 rows each, an uneven last one)."""
    from hyperfl_fast.kernels import conv

    monkeypatch.setattr(conv, "ROWS_PER_SPLIT", 20)
    torch.manual_seed(5)
    inputs = [rand(2, 3, 4, 11, 12), rand(2, 16, 4, 3, 3) / 6, rand(2, 16)]  # 3 x 5 x 6 = 90 rows per client
    check_against_reference(lambda *t, path: ops.batched_conv2d_leaky_pool(*t, padding=1, path=path),
                            inputs, "triton")
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        ops.batched_conv2d_leaky_pool(*leaves, padding=1, path="triton").sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
