"""Logits, per-client losses and test accuracies for stacked clients, and a round's figures for the log."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..federation import ClientResult
from ..models import CNNSpec, extract_features_batched
from .data import Batch, StackedData


def client_results(cids: list[int], *per_client: torch.Tensor, epsilons: list[float] | None = None
                   ) -> list[ClientResult]:
    """ClientResults from (N,) tensors (train loss, local and global accuracy), read to the host in one copy."""
    rows = torch.stack(per_client, 1).tolist()
    return [ClientResult(c, *row, epsilon=None if epsilons is None else e)
            for c, row, e in zip(cids, rows, epsilons or [None] * len(cids))]


def client_losses(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Each client's mean cross-entropy over its valid rows: (N, B, K) -> (N,)."""
    ce = F.cross_entropy(logits.flatten(0, 1), batch.y.flatten(), reduction="none").view(batch.y.shape)
    return (ce * batch.valid).sum(1) / batch.valid.sum(1).clamp(min=1)


def classify(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Per-client classifier heads: (N, B, D) x (N, K, D) + (N, K) -> logits (N, B, K)."""
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))


def cnn_logits(x: torch.Tensor, params: dict[str, torch.Tensor], spec: CNNSpec) -> torch.Tensor:
    """Every client's whole target CNN (its tensors stacked (N, ...) in ``params``): (N, B, C, H, W) -> (N, B, K)."""
    return classify(extract_features_batched(x, params, spec), params["fc2.weight"], params["fc2.bias"])


@torch.no_grad()
def batched_accuracy(data: StackedData, cids: list[int], logits_fn: Callable[[torch.Tensor], torch.Tensor],
                     chunk: int = 200) -> torch.Tensor:
    """Each client's test accuracy (%) with ``logits_fn`` ((N, b, C, H, W) -> (N, b, K)): (N,)."""
    idx = torch.tensor(cids, device=data.test_y.device)
    test_x, test_y, num_test = data.test_x[idx], data.test_y[idx], data.num_test[idx]
    correct = torch.zeros(len(cids), device=test_y.device)
    for start in range(0, test_y.shape[1], chunk):
        pred = logits_fn(test_x[:, start:start + chunk]).argmax(-1)
        rows = torch.arange(start, start + pred.shape[1], device=test_y.device)
        correct += ((pred == test_y[:, start:start + chunk]) & (rows < num_test[:, None])).sum(1)
    return 100.0 * correct / num_test
