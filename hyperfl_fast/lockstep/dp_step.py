"""The lockstep DP-SGD step: every client's clipped per-sample gradient sum of the target CNN, without
materialising the per-sample gradients of its linear layers (ghost clipping), all clients at once.

DP-SGD needs each sample's gradient norm (over every trainable tensor together) and the sum of the clipped
per-sample gradients.  One forward of every client's batch keeps each layer's input and output; one backward
of the *sum* of the per-sample losses gives each sample's gradient at every layer's output (samples do not
interact, so these are exactly the per-sample backprops).  Then, per layer:

- **linear** (fc1, the classifier fc2): a sample's weight gradient is the outer product δ_i a_iᵀ, so its
  squared norm is ‖δ_i‖²‖a_i‖² (plus ‖δ_i‖² for the bias) and the clipped sum is (c ⊙ δ)ᵀ A: one batched
  GEMM per client, and the (N, B, out, in) per-sample tensor (fc1: 87% of the parameters) never exists;
- **convolution**: a sample's weight gradient (at most 64 x 32 x 5 x 5 per sample) is the correlation of its
  input with its output gradient, formed for every sample by one grouped convolution (``vmap`` of
  ``conv2d_weight``), then clipped and summed.  The conv stack runs batch-major, so no layout copies.

The clip factors c_i = min(1, C / (‖g_i‖ + 1e-6)) are zero for padded rows; the noise and the denominator are
:func:`hyperfl_fast.dp.private_gradient`'s (the one clip-and-noise).  The per-sample ``vmap`` path
(:func:`hyperfl_fast.dp.per_example_grads`) stays the oracle: ``tests/test_dp.py`` checks both give the same
clipped, noised sum for the same noise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import vmap
from torch.nn.grad import conv2d_weight

from ..dp import ClientPrivacy, expected_batch_size, noised_mean
from ..models import CNNSpec
from ..ops.activation import LEAKY_SLOPE


def clipped_gradient_sums(spec: CNNSpec, params: dict[str, torch.Tensor], trainable: list[str], x: torch.Tensor,
                          y: torch.Tensor, valid: torch.Tensor, clip: float) -> dict[str, torch.Tensor]:
    """For every client (params (N, ...), x (N, B, C, H, W), y and valid (N, B)): the sum over its valid samples
    of each sample's gradient of its cross-entropy w.r.t. the ``trainable`` tensors, clipped to norm ``clip``
    over all of them together: {name: (N, *shape)} in the order of ``trainable``."""
    with torch.enable_grad():
        return _clipped_gradient_sums(spec, {k: t.detach().requires_grad_(k in trainable) for k, t in params.items()},
                                      trainable, x, y, valid, clip)


def _clipped_gradient_sums(spec, params, trainable, x, y, valid, clip):
    n, b = y.shape
    inputs, outputs = {}, {}
    # the conv stack runs batch-major, (B, N C, H, W): each client's convolution is one group of a grouped conv,
    # and activation and pooling act on each channel alike, so no layout change between layers (channels-last:
    # the CPU's pooling is several times faster so)
    h = x.transpose(0, 1).reshape(b, n * x.shape[2], *x.shape[3:]).contiguous(memory_format=torch.channels_last)
    for i, conv in enumerate(spec.convs, start=1):
        weight = params[f"conv{i}.weight"]
        inputs[f"conv{i}"] = h
        outputs[f"conv{i}"] = F.conv2d(h, weight.flatten(0, 1), params[f"conv{i}.bias"].flatten(), padding=conv.padding,
                                       groups=n)
        h = F.max_pool2d(F.leaky_relu(outputs[f"conv{i}"], LEAKY_SLOPE), 2)
    inputs["fc1"] = h.contiguous().view(b, n, -1).transpose(0, 1)  # (N, B, F)
    outputs["fc1"] = torch.baddbmm(params["fc1.bias"].unsqueeze(1), inputs["fc1"], params["fc1.weight"].transpose(1, 2))
    inputs["fc2"] = F.leaky_relu(outputs["fc1"], LEAKY_SLOPE)
    outputs["fc2"] = torch.baddbmm(params["fc2.bias"].unsqueeze(1), inputs["fc2"], params["fc2.weight"].transpose(1, 2))
    losses = F.cross_entropy(outputs["fc2"].flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    layers = list(dict.fromkeys(name.split(".")[0] for name in trainable))
    deltas = dict(zip(layers, torch.autograd.grad((losses * valid).sum(), [outputs[layer] for layer in layers])))

    per_layer, sq_norm = {}, torch.zeros(y.shape, dtype=x.dtype, device=x.device)  # (N, B)
    for layer in layers:
        delta, a = deltas[layer].detach(), inputs[layer].detach()
        if layer.startswith("conv"):
            shape, pad = params[f"{layer}.weight"].shape[1:], spec.convs[int(layer[4:]) - 1].padding
            a, delta = a.reshape(b * n, 1, *shape[1:2], *a.shape[2:]), delta.reshape(b * n, 1, shape[0], *delta.shape[2:])
            # (B N, Cout, C, k, k): each sample's weight gradient, by a grouped convolution per sample
            weight = vmap(lambda ai, di: conv2d_weight(ai, shape, di, padding=pad))(a, delta)
            weight = weight.view(b, n, shape[0], -1).transpose(0, 1)  # (N, B, Cout, C k k)
            bias = delta.view(b, n, shape[0], -1).sum(-1).transpose(0, 1)  # (N, B, Cout)
            sq_norm += torch.linalg.vector_norm(weight, dim=(2, 3)) ** 2 + torch.linalg.vector_norm(bias, dim=2) ** 2
            per_layer[layer] = (weight, bias)
        else:  # linear: never the per-sample weight gradients, only their norms
            delta_sq = torch.linalg.vector_norm(delta, dim=-1) ** 2  # (N, B)
            sq_norm += delta_sq * (torch.linalg.vector_norm(a, dim=-1) ** 2 + 1.0)
            per_layer[layer] = (delta, a)
    factor = (clip / (sq_norm.sqrt() + 1e-6)).clamp(max=1.0) * valid  # (N, B); padded rows count for nothing
    sums = {}
    for layer in layers:
        first, second = per_layer[layer]
        if layer.startswith("conv"):
            shape = params[f"{layer}.weight"].shape[1:]
            sums[f"{layer}.weight"] = torch.einsum("nb,nbok->nok", factor, first).reshape(-1, *shape)
            sums[f"{layer}.bias"] = torch.einsum("nb,nbo->no", factor, second)
        else:
            scaled = first * factor.unsqueeze(-1)  # (N, B, out)
            sums[f"{layer}.weight"] = torch.bmm(scaled.transpose(1, 2), second)  # (N, out, in)
            sums[f"{layer}.bias"] = scaled.sum(1)
    return {name: sums[name] for name in trainable}


def private_step_grads(spec: CNNSpec, params: dict[str, torch.Tensor], trainable: list[str], x: torch.Tensor,
                       y: torch.Tensor, valid: torch.Tensor, cfg, privacy: ClientPrivacy, cids: list[int],
                       round_idx: int, epoch: int, step: int) -> list[torch.Tensor]:
    """One lockstep DP-SGD step's gradients of the ``trainable`` tensors of ``params`` (N, *shape) for the
    clients ``cids``: ghost-clipped sums, then each client's noise (its sigma, its noise source) over its batch
    size (the expected one under ``--poisson``)."""
    sums = clipped_gradient_sums(spec, params, trainable, x, y, valid, cfg.dp_clip)
    clients = [privacy.client(c) for c in cids]
    generators = [c.generator(round_idx, epoch, step, x.device) for c in clients]
    expected = [expected_batch_size(cfg, privacy.sizes[c]) for c in cids] if cfg.poisson else None
    grads = noised_mean(sums, valid, cfg.dp_clip, [c.sigma for c in clients], generators, expected,
                        privacy.noise.sample)
    return list(grads.values())
