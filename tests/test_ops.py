"""Every fused op against its per-client reference: forward, every gradient, awkward shapes, every kernel config.

The Triton path runs compiled on a GPU and through Triton's interpreter on the CPU (see conftest.py); it runs
once per block configuration of every kernel it launches (``forced_config``), since on a GPU the autotuner may
pick any of them.  Output buffers are poisoned (NaN / out-of-range) so an element a kernel forgets to write
fails the comparison.  Inputs are fresh random numbers, never zeros.
"""
import math

import pytest
import torch
import triton

from hyperfl_fast import ops
from hyperfl_fast.kernels import bmm, classifier, conv, factored, generate, launch

from conftest import DEVICE


def variants(*config_lists) -> list[tuple[str, int]]:
    """(path, forced config) pairs: torch once, Triton once per configuration of its most-configured kernel."""
    return [("torch", 0)] + [("triton", i) for i in range(max(len(c) for c in config_lists))]


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


def run_path(fn, inputs, path, config, grad_out=None):
    """(outputs, gradients of the inputs that require them) of ``fn`` on fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with launch.forced_config(config):
        out = fn(*leaves, path=path)
        outs = out if isinstance(out, tuple) else (out,)
        if grad_out is not None:
            torch.autograd.backward([o for o in outs if o.requires_grad], grad_out)
    return [o.detach() for o in outs], [leaf.grad for leaf in leaves if leaf.is_floating_point()]


def check_against_reference(fn, inputs, path, config=0, atol=1e-4, rtol=1e-4, differentiable=True):
    """Run fn on the reference and on ``path``; compare outputs and (if differentiable) every input gradient."""
    want, _ = run_path(fn, inputs, "reference", 0)
    grad_out = [torch.randn_like(o) for o in want] if differentiable else None
    want, want_grads = run_path(fn, inputs, "reference", 0, grad_out)
    got, got_grads = run_path(fn, inputs, path, config, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol)
    if differentiable:
        for i, (g, w) in enumerate(zip(got_grads, want_grads)):
            assert g is not None and w is not None, f"no gradient for input {i}"
            torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m: f"input {i}: {m}")


# --------------------------------------------------------------------------- weight generation

GEN_SHAPES = [(1, 8, 16, 37), (3, 16, 32, 300), (5, 12, 24, 131)]  # (N, E, H, P): P off every block size


@pytest.mark.parametrize("path,config", variants(generate.GEMV_CONFIGS, bmm.CONFIGS))
@pytest.mark.parametrize("n,e,h,p", GEN_SHAPES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-client"])
def test_generate_weights(path, config, n, e, h, p, shared, poisoned):
    lead = () if shared else (n,)
    inputs = [rand(n, e), rand(*lead, h, e) / math.sqrt(e), rand(*lead, h), rand(*lead, p, h) / math.sqrt(h),
              rand(*lead, p)]
    check_against_reference(ops.generate_weights, inputs, path, config)


@pytest.mark.parametrize("path,config", variants(generate.GEMV_CONFIGS, bmm.CONFIGS))
@pytest.mark.parametrize("n,e,h,p", GEN_SHAPES)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per-client"])
def test_generate_weights_without_the_relu(path, config, n, e, h, p, shared, poisoned):
    """relu=False (a deeper hypernetwork's last two linear layers): every path equals the reference, and the
    result is not the ReLU's (some hidden units are negative on these inputs)."""
    lead = () if shared else (n,)
    inputs = [rand(n, e), rand(*lead, h, e) / math.sqrt(e), rand(*lead, h), rand(*lead, p, h) / math.sqrt(h),
              rand(*lead, p)]
    check_against_reference(lambda *t, path: ops.generate_weights(*t, path=path, relu=False), inputs, path, config)
    with_relu, without = (ops.generate_weights(*inputs, path="reference", relu=r) for r in (True, False))
    assert not torch.allclose(with_relu, without)


# --------------------------------------------------------------------------- batched linear

LINEAR_SHAPES = [(1, 1, 5, 3), (2, 50, 100, 17), (3, 7, 33, 70)]  # (N, B, K, M)


@pytest.mark.parametrize("path,config", variants(bmm.CONFIGS))
@pytest.mark.parametrize("n,b,k,m", LINEAR_SHAPES)
@pytest.mark.parametrize("leaky", [False, True])
def test_batched_linear(path, config, n, b, k, m, leaky, poisoned):
    inputs = [rand(n, b, k), rand(n, m, k) / math.sqrt(k), rand(n, m)]
    check_against_reference(lambda *t, path: ops.batched_linear(*t, leaky=leaky, path=path), inputs, path, config)


def theta_views(n, shapes):
    """Leaf tensors that are views of one flat (N, P) theta, as the engine passes them (client stride P)."""
    sizes = [math.prod(s) for s in shapes]
    theta = rand(n, sum(sizes) + 3)  # a stride no tensor's own size explains

    def views(flat):
        return [piece.reshape(n, *s) for piece, s in zip(flat[:, :sum(sizes)].split(sizes, dim=1), shapes)]
    return theta, views


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_linear_and_conv_take_weights_as_views_of_one_theta(path, poisoned):
    """Weights and biases strided by the flat theta (no copy on the Triton path) give theta's gradient."""
    n, b = 2, 3
    theta, views = theta_views(n, [(4, 2, 3, 3), (4,), (5, 64), (5,)])
    x = rand(n, b, 2, 8, 8)

    def stack(x, theta, path):
        w1, b1, w2, b2 = views(theta)
        return ops.batched_linear(ops.batched_conv2d_leaky_pool(x, w1, b1, 1, path=path).flatten(2), w2, b2,
                                  leaky=True, path=path)

    check_against_reference(stack, [x, theta / 3], path)


# --------------------------------------------------------------------------- batched conv + pool

CONV_SHAPES = [  # (N, B, C, H, Cout, k, padding)
    (1, 1, 1, 12, 16, 5, 0),  # the 1-channel model's conv1 at a smaller image
    (2, 2, 16, 8, 32, 5, 1),  # its conv2
    (2, 2, 32, 6, 64, 3, 1),  # the 3-channel model's conv3
    (3, 2, 3, 9, 5, 3, 0),  # odd conv output (7x7): the last row/column is not pooled; 5 channels
]


@pytest.mark.parametrize("path,config", variants(conv.FWD_CONFIGS, conv.DW_CONFIGS, conv.DX_CONFIGS))
@pytest.mark.parametrize("n,b,c,h,cout,k,pad", CONV_SHAPES)
def test_batched_conv2d_leaky_pool(path, config, n, b, c, h, cout, k, pad, poisoned):
    inputs = [rand(n, b, c, h, h + 1), rand(n, cout, c, k, k) / math.sqrt(c * k * k), rand(n, cout)]
    check_against_reference(lambda *t, path: ops.batched_conv2d_leaky_pool(*t, padding=pad, path=path),
                            inputs, path, config)


@pytest.mark.parametrize("n", [3, 5])
def test_torch_conv_in_client_chunks_matches_reference(n, monkeypatch):
    """The CPU torch path splits clients into chunks when the output is large (here: forced small)."""
    from hyperfl_fast.ops import conv as conv_op
    monkeypatch.setattr(conv_op, "CPU_CHUNK_BYTES", 2 * 2 * 16 * 10 * 10 * 4)  # two clients (B=2) per chunk
    inputs = [torch.randn(n, 2, 3, 10, 10), torch.randn(n, 16, 3, 3, 3) / 5, torch.randn(n, 16)]
    check_against_reference(lambda *t, path: ops.batched_conv2d_leaky_pool(*t, padding=1, path=path),
                            inputs, "torch")


def test_triton_conv_weight_gradient_split_is_exact_and_deterministic(monkeypatch):
    """dW sums each client's window rows in several programs (forced here: 20 rows each, an uneven last one)."""
    monkeypatch.setattr(conv, "ROWS_PER_SPLIT", 20)
    torch.manual_seed(5)
    inputs = [rand(2, 3, 4, 11, 12), rand(2, 16, 4, 3, 3) / 6, rand(2, 16)]  # 3 x 5 x 6 x 4 = 360 rows per client
    check_against_reference(lambda *t, path: ops.batched_conv2d_leaky_pool(*t, padding=1, path=path),
                            inputs, "triton")
    grads = []
    for _ in range(2):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        ops.batched_conv2d_leaky_pool(*leaves, padding=1, path="triton").sum().backward()
        grads.append([leaf.grad for leaf in leaves])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_max_pool_propagates_nan_as_pytorch(path):
    """A NaN in a window wins it (PyTorch's rule), so the output there is NaN, and only there."""
    torch.manual_seed(2)
    x, w, b = rand(1, 2, 1, 8, 8), rand(1, 3, 1, 1, 1).abs() + 0.5, rand(1, 3)
    x[0, 0, 0, 2, 3] = math.nan  # 1x1 kernel: window (1, 1) of sample 0, every channel
    x[0, 1, 0, 5, 5] = math.nan  # window (2, 2) of sample 1
    want = ops.batched_conv2d_leaky_pool(x, w, b, path="reference")
    got = ops.batched_conv2d_leaky_pool(x, w, b, path=path)
    assert torch.equal(got.isnan(), want.isnan()) and want.isnan().sum() == 6
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num())


# --------------------------------------------------------------------------- classifier + cross-entropy

CLASSIFIER_SHAPES = [(1, 1, 16, 2), (3, 37, 24, 10), (2, 70, 128, 10)]  # (N, B, D, K): B across row blocks


def classifier_inputs(n, b, d, k):
    valid = torch.rand(n, b, device=DEVICE) > 0.25
    valid[0, 0] = True
    if n > 1:
        valid[1] = False  # a client without a valid row: loss 0, no gradient
    return [rand(n, b, d), rand(n, k, d) / math.sqrt(d), rand(n, k), torch.randint(0, k, (n, b), device=DEVICE),
            valid]


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("n,b,d,k", CLASSIFIER_SHAPES)
def test_batched_classifier_loss(path, n, b, d, k, poisoned):
    check_against_reference(ops.batched_classifier_loss, classifier_inputs(n, b, d, k), path, atol=1e-5)


@pytest.mark.parametrize("path", ["reference", "torch", "triton"])
def test_classifier_sgd_step_equals_torch_sgd_per_client(path):
    """Two steps (momentum carried) = torch.optim.SGD on each active client's own mean loss; inactive untouched."""
    torch.manual_seed(4)
    n, b, d, k, lr, momentum, wd = 3, 37, 24, 10, 0.1, 0.5, 5e-4
    features, weight, bias, labels, valid = classifier_inputs(n, b, d, k)
    w, bb = weight.clone(), bias.clone()
    w_buf, b_buf = torch.zeros_like(w), torch.zeros_like(bb)
    heads = [torch.nn.Linear(d, k).to(DEVICE) for _ in range(n)]
    for i, head in enumerate(heads):
        head.weight.data.copy_(weight[i]), head.bias.data.copy_(bias[i])
    optimizers = [torch.optim.SGD(h.parameters(), lr=lr, momentum=momentum, weight_decay=wd) for h in heads]
    for step in range(2):
        active = torch.tensor([True, True, step == 1], device=DEVICE)
        ops.classifier_sgd_step(features, w, bb, labels, valid, active, w_buf, b_buf, lr, momentum, wd, path=path)
        for i in range(n):
            if active[i]:  # a client without valid rows has a zero gradient: only weight decay moves it
                for q in heads[i].parameters():
                    q.grad = torch.zeros_like(q)
                if valid[i].any():
                    torch.nn.functional.cross_entropy(heads[i](features[i][valid[i]]), labels[i][valid[i]]).backward()
                optimizers[i].step()
    for i, head in enumerate(heads):
        torch.testing.assert_close(w[i], head.weight.detach(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(bb[i], head.bias.detach(), atol=1e-5, rtol=1e-4)
    assert not torch.equal(w[0], weight[0])


# --------------------------------------------------------------------------- factored heads

def factored_inputs(n, p, h, s, e=8):
    return dict(w0=rand(p, h) / math.sqrt(h), u=rand(n, s, p) / 10, v=rand(n, s, h), alpha=torch.rand(n, device=DEVICE)
                + 0.5, beta=rand(n, s), embedding=rand(n, e), fc_w=rand(n, h, e) / math.sqrt(e), fc_b=rand(n, h),
                bias=rand(n, p))


FACTORED_SHAPES = [(1, 37, 16, 3, 0), (3, 300, 32, 7, 5), (2, 131, 24, 4, 4)]  # (N, P, H, S, span)


@pytest.mark.parametrize("path,config", variants(factored.MATVEC_CONFIGS, factored.RMATVEC_CONFIGS))
@pytest.mark.parametrize("n,p,h,s,span", FACTORED_SHAPES)
def test_factored_generate_and_rmatvec(path, config, n, p, h, s, span, poisoned):
    f = factored_inputs(n, p, h, s)
    factors = (f["w0"], f["u"], f["v"], f["alpha"], f["beta"])
    check_against_reference(lambda *t, path: ops.factored_generate(f["embedding"], f["fc_w"], f["fc_b"], f["bias"],
                                                                   *t, span, path=path),
                            list(factors), path, config, differentiable=False)
    g = rand(n, p)
    check_against_reference(lambda *t, path: ops.factored_rmatvec(g, *t, span, path=path), list(factors), path,
                            config, differentiable=False)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_factored_products_read_views_with_client_strides(path):
    """u and v as the first slots of larger buffers (the engine's capacity): only ``span`` slots are read."""
    n, p, h, s = 2, 70, 16, 5
    f = factored_inputs(n, p, h, s + 3)
    u, v = f["u"][:, :s], f["v"][:, :s]
    f["u"][:, s:], f["v"][:, s:] = math.nan, math.nan  # never read
    args = (f["embedding"], f["fc_w"], f["fc_b"], f["bias"], f["w0"], u, v, f["alpha"], f["beta"][:, :s].contiguous(),
            s)
    want = ops.factored_generate(*args, path="reference")
    for got, w in zip(ops.factored_generate(*args, path=path), want):
        torch.testing.assert_close(got, w, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the hypernetwork step's updates

def hypernet_state(n, h, e, s, seed):
    torch.manual_seed(seed)
    scale = torch.logspace(-3, 1, n, device=DEVICE)  # client 0's gradients stay under the clip, the last's do not
    return dict(d_hidden=rand(n, h) * scale[:, None], hidden=rand(n, h).relu(), g_sq=scale * 500,
                embedding=rand(n, e), fc_w=rand(n, h, e), fc_b=rand(n, h), embedding_buf=rand(n, e),
                fc_w_buf=rand(n, h, e), fc_b_buf=rand(n, h), alpha=torch.rand(n, device=DEVICE),
                gamma=torch.rand(n, device=DEVICE), beta=rand(n, s), delta=rand(n, s), v_factors=rand(n, s, h),
                slot=torch.tensor([2], device=DEVICE), active=torch.arange(n, device=DEVICE) != 1,
                losses=torch.rand(n, device=DEVICE), loss_sum=torch.rand(n, device=DEVICE),
                loss_count=torch.rand(n, device=DEVICE), coef=torch.zeros(n, device=DEVICE))


@pytest.mark.parametrize("path", ["torch", "triton"])
@pytest.mark.parametrize("n,h,e,s", [(3, 32, 8, 6), (2, 20, 5, 3)])
def test_hypernet_client_update(path, n, h, e, s):
    results = {}
    for p in ("reference", path):
        state = hypernet_state(n, h, e, s, seed=0)
        ops.hypernet_client_update(*state.values(), 0.02, 0.5, 5e-4, 50.0, path=p)
        results[p] = state
    for name, want in results["reference"].items():
        torch.testing.assert_close(results[path][name], want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    coef = results["reference"]["coef"]
    assert (coef < 1).any() and (coef == 1).any()  # the test exercises clipped and unclipped clients


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_hypernet_heads_update(path):
    n, p, s = 3, 1500, 6  # P past one block
    results = {}
    for q in ("reference", path):
        torch.manual_seed(3)
        args = [rand(n, p), torch.rand(n, device=DEVICE), rand(n, s, p), torch.tensor([4], device=DEVICE), rand(n, p),
                rand(n, p), torch.tensor([True, False, True], device=DEVICE)]
        ops.hypernet_heads_update(*args, 0.02, 0.5, 5e-4, path=q)
        results[q] = args
    for i in (2, 4, 5):
        torch.testing.assert_close(results[path][i], results["reference"][i], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- fused dense head step

@pytest.mark.parametrize("path", ["reference", "torch", "triton"])
@pytest.mark.parametrize("n,e,h,p", [(1, 6, 16, 45), (3, 8, 32, 200)])
def test_fused_head_step_matches_clip_and_sgd(path, n, e, h, p):
    """Three consecutive steps (momentum carried) vs clip_grad_norm_ + torch.optim.SGD per client."""
    lr, momentum, wd, clip = 0.05, 0.5, 5e-4, 20.0
    torch.manual_seed(n * 100 + p)
    fc_w, fc_b, head_w, head_b = rand(n, h, e), rand(n, h), rand(n, p, h) / math.sqrt(h), rand(n, p)
    emb = rand(n, e)
    modules = []
    for i in range(n):
        fc, heads = torch.nn.Linear(e, h).to(DEVICE), torch.nn.Linear(h, p).to(DEVICE)
        with torch.no_grad():
            fc.weight.copy_(fc_w[i]), fc.bias.copy_(fc_b[i]), heads.weight.copy_(head_w[i]), heads.bias.copy_(head_b[i])
        params = [*fc.parameters(), *heads.parameters()]
        modules.append((fc, heads, params, torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=wd)))
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


# --------------------------------------------------------------------------- coverage of the kernels

def test_every_tuned_kernel_is_exercised_by_these_tests():
    """Each autotuned kernel appears in an op test above that steps through all its configurations."""
    import importlib
    import pkgutil

    import hyperfl_fast.kernels as kernels

    tuned = {obj.name for info in pkgutil.iter_modules(kernels.__path__)
             for obj in vars(importlib.import_module(f"hyperfl_fast.kernels.{info.name}")).values()
             if isinstance(obj, launch.Tuned)}
    covered = {  # the kernels each variants(...) list above was built from
        "_gemv_kernel": generate.GEMV_CONFIGS, "_bmm_kernel": bmm.CONFIGS, "_conv_pool_fwd_kernel": conv.FWD_CONFIGS,
        "_conv_dw_kernel": conv.DW_CONFIGS, "_conv_dx_kernel": conv.DX_CONFIGS,
        "_matvec_kernel": factored.MATVEC_CONFIGS, "_rmatvec_partial_kernel": factored.RMATVEC_CONFIGS}
    assert tuned == set(covered)
    assert classifier.BLOCK_B > 0  # the classifier kernels have one fixed configuration each


# --------------------------------------------------------------------------- offsets past 2**31

OFFSETS_SCRIPT = r"""
import os
os.environ["TRITON_INTERPRET"] = "1"
import torch
from hyperfl_fast.kernels import factored, generate

n, p, h, s = 3, 64, 16, 2
stride = 2**30 + 4096  # fits int32, but client 2 starts at element 2**31 + 8192
big = torch.empty(2 * stride + s * p * h)  # 8 GiB of address space, of which a few pages are ever touched
w = big.as_strided((n, p, h), (stride, h, 1))
u = big.as_strided((n, s, p), (stride, p, 1))
for i in range(n):
    w[i].normal_()
x, b = torch.randn(n, h), torch.randn(n, p)
worst = (generate.gemv(w, x, b) - torch.stack([w[i] @ x[i] + b[i] for i in range(n)])).abs().max()
for i in range(n):
    u[i].normal_()
w0, v, alpha, beta = torch.randn(p, h), torch.randn(n, s, h), torch.rand(n), torch.randn(n, s)
emb, fc_w, fc_b = torch.randn(n, 4), torch.randn(n, h, 4), torch.randn(n, h)
theta, hidden = factored.generate(emb, fc_w, fc_b, b, w0, u, v, alpha, beta, s, "ieee")
want = torch.stack([(alpha[i] * w0 + (u[i] * beta[i, :, None]).t() @ v[i]) @ hidden[i] + b[i] for i in range(n)])
worst = max(worst, (theta - want).abs().max())
print("max error", float(worst))
"""


@pytest.mark.skipif(tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 8),
                    reason="the interpreter of Triton < 3.8 cannot loop to a runtime bound (range(0, C, BLOCK_C) "
                           "fails, seen with 3.6 on a GPU image); the pinned triton 3.8 runs this")
def test_client_offsets_past_2_31_elements():
    """A client whose block starts past 2**31 elements: int32 offsets would wrap (and crash), int64 ones do not.
    In a subprocess: a wrapped offset reads outside the allocation and kills the interpreter."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", OFFSETS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 1e-4
