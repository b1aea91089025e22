"""Every client's data stacked on the device, and a round's schedule: each step a batch for every client at once."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..data import apply_crop_flip, draw_crop_flip
from ..federation import ClientData, make_generator, poisson_masks


class StackedData:
    """All clients' data stacked on the device, padded to the largest client: (Nc, n_max, C, H, W)."""

    def __init__(self, clients: list[ClientData]):
        def stack(tensors):
            out = tensors[0].new_zeros(len(tensors), max(len(t) for t in tensors), *tensors[0].shape[1:])
            for i, t in enumerate(tensors):
                out[i, :len(t)] = t
            return out

        self.clients = clients
        self.train_x, self.train_y = stack([c.train_x for c in clients]), stack([c.train_y for c in clients])
        self.test_x, self.test_y = stack([c.test_x for c in clients]), stack([c.test_y for c in clients])
        device = self.train_y.device
        self.num_train = torch.tensor([c.num_train for c in clients], device=device)
        self.num_test = torch.tensor([len(c.test_y) for c in clients], device=device)
        self.augment = clients[0].augment

    def weights(self, idx: torch.Tensor) -> torch.Tensor:
        """(N,) the shares of clients ``idx`` in their total training samples: FedAvg's aggregation weights."""
        sizes = self.num_train[idx].to(self.train_x.dtype)
        return sizes / sizes.sum()


def weighted_mean(weights: torch.Tensor, stacked: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The server's average of stacked per-client tensors (N, ...) with ``weights`` (N,): each (1, ...)."""
    return {k: torch.einsum("n,n...->...", weights, t).unsqueeze(0) for k, t in stacked.items()}


@dataclass
class Batch:
    x: torch.Tensor  # (N, B, C, H, W)
    y: torch.Tensor  # (N, B)
    valid: torch.Tensor  # (N, B) bool: real rows (False pads short batches)
    active: torch.Tensor  # (N,) bool: the client takes this step (a Poisson-sampled batch may still be empty)

    @property
    def nonempty(self) -> torch.Tensor:
        """(N,) bool: the client's batch has rows (equals ``active`` for shuffled batches)."""
        return self.valid.any(1)


class RoundSchedule:
    """Every epoch of one round for the clients ``cids`` in lockstep, with the reference's per-client draws.

    All of the round's shuffles (or, for ``poisson_epochs``, Poisson-sampled
    DP-SGD batches, :func:`hyperfl_fast.federation.poisson_masks`) and
    augmentation draws are made up front, on the CPU generators keyed by
    (seed, round, client, epoch) exactly as the reference draws them, and
    copied to the device once; local training then only slices them (no host
    round trip per epoch or step).  A batch size larger than the largest
    client is clamped to it, so nothing is padded beyond the data (the
    reference's batches cannot be larger either).  Poisson batches vary in size
    and are padded to the round's largest.
    """

    def __init__(self, data: StackedData, cids: list[int], batch_size: int, seed: int, round_idx: int,
                 epochs: range, poisson_epochs: Iterable[int] = ()):
        largest = max(data.clients[c].num_train for c in cids)
        self.data, self.epochs = data, epochs
        self.batch_size = min(batch_size, largest)
        self.num_steps = -(-largest // self.batch_size)
        poisson_epochs = set(poisson_epochs)
        layouts = [self._poisson(data, cids, batch_size, seed, round_idx, epoch) if epoch in poisson_epochs
                   else self._shuffled(data, cids, seed, round_idx, epoch) for epoch in epochs]
        self.widths = [width for width, *_ in layouts]
        total = max(self.num_steps * width for width in self.widths)

        def stack(i):  # one tensor per kind over the epochs, padded to the widest: (E, ..., total)
            return torch.stack([torch.nn.functional.pad(layout[i], (0, total - layout[i].shape[-1]))
                                for layout in layouts])

        device = data.train_y.device
        # one host-to-device copy per round each: (E, N, total), (E, N, total), (E, 3, N, total)
        self.rows, self.valid, self.aug = stack(1).to(device), stack(2).to(device), stack(3).to(device)
        self.client_idx = torch.tensor(cids, device=device)[:, None]
        client_steps = torch.tensor([-(-data.clients[c].num_train // self.batch_size) for c in cids],
                                    device=device)  # (N,)
        self.active = torch.arange(self.num_steps, device=device)[:, None] < client_steps  # (steps, N)

    def _shuffled(self, data, cids, seed, round_idx, epoch):
        """(batch width, rows, valid, aug) of one shuffled epoch: the reference's randperm, batch by batch."""
        width = self.num_steps * self.batch_size
        rows = torch.zeros(len(cids), width, dtype=torch.long)
        valid = torch.zeros(len(cids), width, dtype=torch.bool)
        aug = torch.zeros(3, len(cids), width, dtype=torch.long)  # dy, dx, flip
        for i, cid in enumerate(cids):
            n = data.clients[cid].num_train
            gen = make_generator(seed, round_idx, cid, epoch)
            rows[i, :n] = torch.randperm(n, generator=gen)
            valid[i, :n] = True
            if data.augment:
                for start in range(0, n, self.batch_size):  # the reference draws batch by batch
                    stop = min(start + self.batch_size, n)
                    aug[:, i, start:stop] = torch.stack([t.long() for t in draw_crop_flip(stop - start, gen)])
        return self.batch_size, rows, valid, aug

    def _poisson(self, data, cids, batch_size, seed, round_idx, epoch):
        """(batch width, rows, valid, aug) of one Poisson-sampled epoch, padded to its largest batch."""
        members = []  # per client, per step: the sample indices
        for cid in cids:
            client = data.clients[cid]
            gen, masks = poisson_masks(client.num_train, batch_size, seed, round_idx, cid, epoch)
            steps = [mask.nonzero().flatten() for mask in masks]
            augs = [torch.stack([t.long() for t in draw_crop_flip(len(idx), gen)]) for idx in steps] \
                if data.augment else None  # drawn after the masks, batch by batch, as the reference does
            members.append((steps, augs))
        width = max(1, max(len(idx) for steps, _ in members for idx in steps))
        rows = torch.zeros(len(cids), self.num_steps * width, dtype=torch.long)
        valid = torch.zeros(len(cids), self.num_steps * width, dtype=torch.bool)
        aug = torch.zeros(3, len(cids), self.num_steps * width, dtype=torch.long)
        for i, (steps, augs) in enumerate(members):
            for t, idx in enumerate(steps):
                cols = slice(t * width, t * width + len(idx))
                rows[i, cols], valid[i, cols] = idx, True
                if augs is not None:
                    aug[:, i, cols] = augs[t]
        return width, rows, valid, aug

    def batches(self, epoch: int) -> Iterable[Batch]:
        """The steps of ``epoch`` (one of the schedule's epochs): the epoch's samples are gathered (and augmented)
        for all clients at once, and each step's batch is a view of them."""
        data, e = self.data, self.epochs.index(epoch)
        rows, valid, aug, width = self.rows[e], self.valid[e], self.aug[e], self.widths[e]
        used = slice(0, self.num_steps * width)
        x = data.train_x[self.client_idx, rows[:, used]]  # (N, steps * width, C, H, W)
        if data.augment:
            x = apply_crop_flip(x.flatten(0, 1), *(a[:, used].flatten() for a in aug[:2]),
                                aug[2, :, used].flatten().bool()).reshape(x.shape).contiguous()
        y = data.train_y[self.client_idx, rows[:, used]]  # (N, steps * width)
        for step in range(self.num_steps):
            cols = slice(step * width, (step + 1) * width)
            yield Batch(x[:, cols], y[:, cols], valid[:, cols], self.active[step])
