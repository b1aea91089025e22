"""LPIPS (Zhang et al. 2018, AlexNet variant) from local weight files only; never downloads.

Needs two files the user already has: torchvision's AlexNet weights (a state
dict of ``torchvision.models.alexnet``) and LPIPS's linear-layer weights for
AlexNet (``lin0.model.1.weight`` ... ``lin4.model.1.weight``, as in the LPIPS
release's ``alex.pth``).  Without them, reports say LPIPS was not computed.

Distance: inputs in [0, 1] are mapped to [-1, 1], scaled per channel, resized
to at least 64 x 64 (AlexNet's pooling leaves nothing of 28 x 28 images), and
grey images repeated to RGB; the five ReLU feature maps are unit-normalised
over channels, their squared differences weighted by the linear layers,
averaged over space and summed over layers.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

TAPS = (1, 4, 7, 9, 11)  # AlexNet.features indices of relu1 ... relu5
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


class LPIPS(torch.nn.Module):
    """Learned perceptual distance; lower is more similar (0 for identical images)."""

    def __init__(self, alexnet_weights: str | Path, linear_weights: str | Path):
        super().__init__()
        from torchvision.models import alexnet

        for path in (alexnet_weights, linear_weights):
            if not Path(path).is_file():
                raise ValueError(f"LPIPS: weight file {path} does not exist")
        net = alexnet(weights=None)
        try:
            net.load_state_dict(torch.load(alexnet_weights, map_location="cpu", weights_only=True))
            linear = torch.load(linear_weights, map_location="cpu", weights_only=True)
            self.lins = [linear[f"lin{i}.model.1.weight"].float() for i in range(len(TAPS))]  # (1, C, 1, 1)
        except (RuntimeError, KeyError, OSError) as exc:
            raise ValueError(f"LPIPS: cannot load weights ({exc})") from None
        self.features = net.features[:TAPS[-1] + 1].eval()
        for p in self.features.parameters():
            p.requires_grad_(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if min(x.shape[-2:]) < 64:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
        shift, scale = torch.tensor(SHIFT).view(1, 3, 1, 1), torch.tensor(SCALE).view(1, 3, 1, 1)
        x = ((2 * x - 1) - shift) / scale
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image distance between (B, C, H, W) batches in [0, 1]: (B,)."""
        return sum(F.conv2d((a - b).pow(2), lin).mean((1, 2, 3))
                   for a, b, lin in zip(self._taps(x), self._taps(y), self.lins))
