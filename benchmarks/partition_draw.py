"""What the non-IID partition's draw is worth: Local accuracy on several partitions of Fashion-MNIST, one trainer.

Issue 20 asked why some 200-round Fashion-MNIST figures differ from the HyperFL paper's. The partition is one
candidate. The authors' ``mnist_noniid_s`` (``cnn/data_loader.py``) sorts the indices by label and hands out
contiguous windows, of the training set and of the test set alike; its sort is not stable, so the samples each
client gets depend on numpy's sort, not on a seed. This package gives every client the same number of samples
of each class, but its training windows come from class pools shuffled by ``--seed``, and each client's test
split is a random draw within each class. So the two give the clients different samples, and the seed picks a
different draw each time.

For every partition this script trains one Local model per client (or per sampled client) with the same trainer:
the paper's CNN, SGD lr 0.02, momentum 0.5, weight decay 5e-4, batch 50, and a new optimiser every 5 epochs
(as in the authors' ``local_training``), ``--rounds`` x 5 epochs; client ``i``'s initialisation and batch order
come from seed ``i`` in every partition. It prints, per partition, the mean test accuracy of the clients'
models, its spread over clients, the mean per class group, and the mean difference from the first partition,
client by client, with its standard error.

The partitions are, first, the authors' own ``mnist_noniid_s`` when ``--authors-data-loader`` names their
``cnn/data_loader.py`` (imported and run unchanged; it needs torchvision), then this package's for each of
``--seeds``. Run on the CPU (one thread)::

    OMP_NUM_THREADS=1 python benchmarks/partition_draw.py --clients 20 --seeds 0,1 \\
        --authors-data-loader /path/to/HyperFL/cnn/data_loader.py
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hyperfl_fast.config import Config
from hyperfl_fast.data import FMNIST_DIR, DatasetError, load_fmnist
from hyperfl_fast.models import TargetCNN, cnn_spec
from hyperfl_fast.partition import partition

_DEFAULTS = Config()  # the package's defaults, the authors' (cnn/options.py)
LOCAL_EPOCHS, BATCH, LR = _DEFAULTS.local_epochs, _DEFAULTS.batch_size, _DEFAULTS.lr
MOMENTUM, WEIGHT_DECAY = _DEFAULTS.momentum, _DEFAULTS.weight_decay
LOCAL_SIZE, IID_SHARE = 600, 0.2  # samples per client (train and test) and the share spread over all classes


class _Labels:
    """What ``mnist_noniid_s`` reads from a torchvision dataset: ``.targets`` and ``len()``."""

    def __init__(self, labels: np.ndarray):
        self.targets = labels

    def __len__(self) -> int:
        return len(self.targets)


def load_authors_partition(path: Path):
    """The authors' ``mnist_noniid_s`` from their ``cnn/data_loader.py``; a one-line ValueError if it is not there."""
    spec = importlib.util.spec_from_file_location("authors_data_loader", path)
    if spec is None:
        raise ValueError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except (ImportError, SystemExit) as exc:
        raise ValueError(f"{path} does not import: {exc!r}") from None
    if not hasattr(module, "mnist_noniid_s"):
        raise ValueError(f"{path} has no mnist_noniid_s (the authors' cnn/data_loader.py has)")
    return module.mnist_noniid_s


def authors_splits(mnist_noniid_s, train_labels: np.ndarray, test_labels: np.ndarray, clients: int):
    """The authors' split: [(train indices, test indices)] per client."""
    train = mnist_noniid_s(_Labels(train_labels), clients, round(100 * IID_SHARE), LOCAL_SIZE)
    test = mnist_noniid_s(_Labels(test_labels), clients, round(100 * IID_SHARE), LOCAL_SIZE)
    return [(np.asarray(train[i], dtype=np.int64), np.asarray(test[i], dtype=np.int64)) for i in range(clients)]


def local_accuracy(x_train, y_train, x_test, y_test, rounds: int, seed: int) -> float:
    """Train the paper's CNN on one client's data as Local does; its test accuracy in %."""
    torch.manual_seed(seed)
    model = TargetCNN(cnn_spec(1, 10))
    order = torch.Generator().manual_seed(seed)
    for _ in range(rounds):
        optimiser = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        for _ in range(LOCAL_EPOCHS):
            for batch in torch.randperm(len(x_train), generator=order).split(BATCH):
                optimiser.zero_grad()
                F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
                optimiser.step()
    with torch.no_grad():
        return 100.0 * (model(x_test).argmax(1) == y_test).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20, help="clients in the partition (e.g. 20 or 100)")
    parser.add_argument("--sample", type=int, default=None,
                        help="train this many of them, the same ones for every partition (default: all)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of 5 local epochs per client")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated --seed values of this package's partition ('' for none)")
    parser.add_argument("--authors-data-loader", type=Path, default=None,
                        help="path of the authors' cnn/data_loader.py, to add their mnist_noniid_s partition")
    parser.add_argument("--data-dir", default=None,
                        help=f"folder holding fashion-mnist/ (default, or when it has none: {FMNIST_DIR})")
    args = parser.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds: {args.seeds!r} is not a comma-separated list of integers")
    if any(seed < 0 for seed in seeds):
        parser.error("--seeds: a seed must not be negative")
    if args.clients < 1 or args.rounds < 1:
        parser.error("--clients and --rounds must be at least 1")
    if args.sample is not None and not 1 <= args.sample <= args.clients:
        parser.error(f"--sample must be between 1 and --clients ({args.clients})")
    mnist_noniid_s = None
    if args.authors_data_loader is not None:
        if not args.authors_data_loader.is_file():
            parser.error(f"--authors-data-loader: no file {args.authors_data_loader}")
        try:
            mnist_noniid_s = load_authors_partition(args.authors_data_loader)
        except ValueError as exc:
            parser.error(f"--authors-data-loader: {exc}")
    if not seeds and mnist_noniid_s is None:
        parser.error("nothing to compare: give --seeds or --authors-data-loader")
    try:
        dataset = load_fmnist(args.data_dir)
    except DatasetError as exc:
        sys.exit(f"partition_draw.py: {exc}")

    x_train, x_test = dataset.normalize(dataset.train_images), dataset.normalize(dataset.test_images)
    y_train, y_test = dataset.train_labels, dataset.test_labels
    partitions = {}
    if mnist_noniid_s is not None:
        partitions["authors' mnist_noniid_s"] = authors_splits(mnist_noniid_s, y_train.numpy(), y_test.numpy(),
                                                               args.clients)
    for seed in seeds:
        splits = partition(y_train.numpy(), y_test.numpy(), dataset.num_classes, dataset.class_groups, args.clients,
                           LOCAL_SIZE, LOCAL_SIZE, IID_SHARE, False, seed)
        partitions[f"package, seed {seed}"] = [(s.train, s.test) for s in splits]
    picked = np.arange(args.clients) if args.sample is None else \
        np.sort(np.random.default_rng(1).choice(args.clients, args.sample, replace=False))
    groups = len(dataset.class_groups)

    print(f"Local on Fashion-MNIST, {args.clients} clients ({len(picked)} trained"
          + ("" if args.sample is None else f": {', '.join(map(str, picked))}")
          + f"), {args.rounds} x {LOCAL_EPOCHS} epochs each", flush=True)
    first = None  # the first partition's per-client accuracies, to pair the others with
    for name, splits in partitions.items():
        start = time.time()
        accs = []
        for done, client in enumerate(picked, start=1):
            train, test = (torch.as_tensor(idx) for idx in splits[client])
            accs.append(local_accuracy(x_train[train], y_train[train], x_test[test], y_test[test], args.rounds,
                                       int(client)))
            print(f"\r  {name}: client {done}/{len(picked)}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        accs = np.array(accs)
        group_accs = [accs[picked % groups == g] for g in range(groups)]
        by_group = " / ".join(f"{g.mean():.2f}" if len(g) else "-" for g in group_accs)
        paired = ""
        if first is None:
            first = (name, accs)
        elif len(accs) > 1:
            diff = accs - first[1]
            paired = (f" | minus {first[0]}, client by client: {diff.mean():+.2f} "
                      f"(standard error {diff.std(ddof=1) / np.sqrt(len(diff)):.2f})")
        print(f"{name}: mean {accs.mean():.2f}% (std over clients {accs.std():.2f}; by class group "
              f"{by_group}){paired} | {time.time() - start:.0f} s", flush=True)

if __name__ == "__main__":
    main()
