"""Reconstruction quality: PSNR, SSIM and the best matching between reconstructions and ground truth.

Images are (B, C, H, W) in [0, 1].  LPIPS, which needs local pretrained
weights, is in :mod:`.lpips`.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB: 10 log10(range² / MSE); inf for identical images."""
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 .01, K2 .03).

    Computed per channel over the valid region and averaged; identical images give 1.
    """
    c = x.shape[1]
    win = min(window, x.shape[-1], x.shape[-2])
    kernel = _gaussian_window(win).to(x).expand(c, 1, win, win)
    x64, y64 = x.double(), y.double()

    def blur(t):
        return F.conv2d(t, kernel.double(), groups=c)

    mu_x, mu_y = blur(x64), blur(y64)
    var_x = blur(x64 * x64) - mu_x ** 2
    var_y = blur(y64 * y64) - mu_y ** 2
    cov = blur(x64 * y64) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1).to(x.dtype)


def best_matches(candidates: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """For each ground-truth image, the candidate with the highest PSNR against it (candidates may repeat):
    (len(truth), C, H, W).  For attacks that return any number of candidates, e.g. one per trap row."""
    scores = torch.stack([psnr(candidates, t.expand_as(candidates)) for t in truth])  # (truth, candidates)
    return candidates[scores.argmax(1)]


def match_to_ground_truth(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Reorder ``recon`` so that recon[i] pairs with truth[i], maximising the total PSNR.

    Exhaustive over permutations (batch sizes up to 8: 40,320 orders).
    """
    b = len(truth)
    if b > 8:
        raise ValueError(f"matching supports batches of at most 8 images, got {b}")
    scores = torch.stack([psnr(recon[i].expand_as(truth), truth).clamp(max=1e6) for i in range(b)])  # (rec, gt)
    best = max(itertools.permutations(range(b)), key=lambda perm: sum(scores[perm[j], j].item() for j in range(b)))
    return recon[list(best)]
