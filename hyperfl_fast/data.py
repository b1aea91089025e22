"""Datasets: real files on disk (never downloaded), a synthetic set for tests, augmentation.

Every loader returns an :class:`ImageDataset` holding uint8 images (N, C, H, W)
and int64 labels; :meth:`ImageDataset.normalize` turns images into the float
inputs the models see.  A missing or malformed file raises :class:`DatasetError`
naming the dataset, the path and what must be placed there.
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
TEN_CLASS_GROUPS = ((0, 1, 2), (2, 3, 4), (4, 5, 6), (6, 7, 8), (8, 9, 0))
EMNIST_GROUPS = (tuple(range(0, 10)), tuple(range(10, 36)), tuple(range(36, 62)))  # digits, upper, lower
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DatasetError(ValueError):
    """A dataset's files are missing or malformed."""


@dataclass
class ImageDataset:
    """A labelled image dataset with its normalisation and partition metadata."""

    name: str
    train_images: torch.Tensor  # (N, C, H, W) uint8
    train_labels: torch.Tensor  # (N,) int64
    test_images: torch.Tensor  # (M, C, H, W) uint8
    test_labels: torch.Tensor  # (M,) int64
    num_classes: int
    mean: tuple[float, ...]  # per channel, in [0, 1] units
    std: tuple[float, ...]
    class_groups: tuple[tuple[int, ...], ...]  # dominant-class groups for the non-IID partition
    augment: bool  # random crop 32 (padding 4) + horizontal flip on training batches
    local_size: int  # default training samples per client
    test_size: int  # default test samples per client

    @property
    def in_channels(self) -> int:
        return self.train_images.shape[1]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (..., C, H, W) -> normalised float32."""
        mean = torch.tensor(self.mean, device=images.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(-1, 1, 1)
        return (images.float() / 255.0 - mean) / std


# --------------------------------------------------------------------------- readers

def read_idx(path: Path, dataset: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped): the MNIST family's format."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{dataset}: cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{dataset}: {path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DatasetError(f"{dataset}: {path} is truncated or malformed (header says {dims})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_file(folder: Path, stem: str, dataset: str, hint: str) -> Path:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{dataset}: missing {folder / stem}[.gz]. {hint}")


def _idx_pair(folder: Path, prefix: str, split: str, dataset: str, hint: str):
    images = read_idx(_find_file(folder, f"{prefix}{split}-images-idx3-ubyte", dataset, hint), dataset)
    labels = read_idx(_find_file(folder, f"{prefix}{split}-labels-idx1-ubyte", dataset, hint), dataset)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{dataset}: images {images.shape} and labels {labels.shape} in {folder} do not match")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------- datasets

def load_fmnist(data_dir: Path | None) -> ImageDataset:
    """Fashion-MNIST: <data-dir>/fashion-mnist/ if present, else Debian's dataset-fashion-mnist files."""
    local = Path(data_dir) / "fashion-mnist" if data_dir else None
    folder = local if local is not None and local.is_dir() else FMNIST_DIR
    hint = ("Install it with `sudo apt-get install dataset-fashion-mnist` (files land in "
            f"{FMNIST_DIR}) or place train/t10k-*-idx*-ubyte.gz there.")
    train = _idx_pair(folder, "", "train", "fmnist", hint)
    test = _idx_pair(folder, "", "t10k", "fmnist", hint)
    return ImageDataset("fmnist", *train, *test, 10, (0.1307,), (0.3081,), TEN_CLASS_GROUPS, False,
                        *DATASET_SIZES["fmnist"])


def load_emnist(data_dir: Path | None) -> ImageDataset:
    """EMNIST byclass (62 classes) in torchvision's layout: <data-dir>/EMNIST/raw/emnist-byclass-*."""
    folder = Path(data_dir or ".") / "EMNIST" / "raw"
    hint = ("Place torchvision's EMNIST raw files there (emnist-byclass-{train,test}-{images-idx3,labels-idx1}"
            "-ubyte, optionally .gz), as torchvision.datasets.EMNIST(root=<data-dir>, split='byclass') leaves them.")
    train = _idx_pair(folder, "emnist-byclass-", "train", "emnist", hint)
    test = _idx_pair(folder, "emnist-byclass-", "test", "emnist", hint)
    return ImageDataset("emnist", *train, *test, 62, (0.1307,), (0.3081,), EMNIST_GROUPS, False,
                        *DATASET_SIZES["emnist"])


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    hint = ("Place the python version of CIFAR-10 there (cifar-10-batches-py/data_batch_1..5 and test_batch), "
            "as torchvision.datasets.CIFAR10(root=<data-dir>) leaves it.")
    if not path.is_file():
        raise DatasetError(f"cifar10: missing {path}. {hint}")
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry["labels"], dtype=np.int64)
    except Exception as exc:  # any unpickling/shape problem is the same user-facing error
        raise DatasetError(f"cifar10: {path} is malformed ({exc}). {hint}") from None
    return images, labels


def load_cifar10(data_dir: Path | None) -> ImageDataset:
    """CIFAR-10 in torchvision's layout: <data-dir>/cifar-10-batches-py/."""
    folder = Path(data_dir or ".") / "cifar-10-batches-py"
    parts = [_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6)]
    test_x, test_y = _cifar_batch(folder / "test_batch")
    train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return ImageDataset("cifar10", train_x, train_y, torch.from_numpy(test_x), torch.from_numpy(test_y), 10,
                        (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), TEN_CLASS_GROUPS, True,
                        *DATASET_SIZES["cifar10"])


def _image_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image  # Pillow comes with torchvision

    hint = ("Place CINIC-10 there in its released layout: CINIC-10/{train,test}/<class>/*.png with the ten "
            f"classes {', '.join(CIFAR10_CLASSES)}.")
    images, labels = [], []
    for label, name in enumerate(CIFAR10_CLASSES):
        class_dir = folder / name
        files = sorted(class_dir.glob("*.png")) if class_dir.is_dir() else []
        if not files:
            raise DatasetError(f"cinic10: no PNG images in {class_dir}. {hint}")
        for file in files:
            try:
                with Image.open(file) as img:
                    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
            except OSError as exc:
                raise DatasetError(f"cinic10: cannot read {file} ({exc}). {hint}") from None
            if array.shape != (32, 32, 3):
                raise DatasetError(f"cinic10: {file} is {array.shape}, expected 32x32 RGB. {hint}")
            images.append(array)
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def load_cinic10(data_dir: Path | None) -> ImageDataset:
    """CINIC-10 as image folders: <data-dir>/CINIC-10/{train,test}/<class>/*.png."""
    folder = Path(data_dir or ".") / "CINIC-10"
    train = _image_folder(folder / "train")
    test = _image_folder(folder / "test")
    return ImageDataset("cinic10", *train, *test, 10, (0.47889522, 0.47227842, 0.43047404),
                        (0.24205776, 0.23828046, 0.25874835), TEN_CLASS_GROUPS, True, *DATASET_SIZES["cinic10"])


def make_synthetic(in_channels: int = 1, train_per_class: int = 300, test_per_class: int = 100,
                   num_classes: int = 10) -> ImageDataset:
    """A small learnable dataset: each class is a fixed smooth random pattern plus pixel noise.

    The patterns are fixed (seed 0) so the dataset is the same in every run;
    1-channel images are 28x28 (the Fashion-MNIST model), 3-channel 32x32 with
    augmentation on (the CIFAR model).
    """
    size = 28 if in_channels == 1 else 32
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(num_classes, in_channels, 7, 7, generator=gen)
    patterns = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)

    def draw(per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        noise = torch.randn(len(labels), in_channels, size, size, generator=gen)
        pixels = 128 + 40 * patterns[labels] + 50 * noise
        return pixels.clamp(0, 255).to(torch.uint8), labels

    name = "synthetic" if in_channels == 1 else "synthetic-rgb"
    return ImageDataset(name, *draw(train_per_class), *draw(test_per_class), num_classes,
                        (0.5,) * in_channels, (0.25,) * in_channels, TEN_CLASS_GROUPS, in_channels == 3,
                        *DATASET_SIZES[name])


DATASETS = {
    "fmnist": load_fmnist,
    "emnist": load_emnist,
    "cifar10": load_cifar10,
    "cinic10": load_cinic10,
    "synthetic": lambda data_dir: make_synthetic(1),
    "synthetic-rgb": lambda data_dir: make_synthetic(3),
}


# (training, test) samples per client by default: known before any data is read (the DP budget check needs them)
DATASET_SIZES = {"fmnist": (600, 600), "emnist": (1000, 600), "cifar10": (600, 300), "cinic10": (600, 300),
                 "synthetic": (100, 50), "synthetic-rgb": (100, 50)}
# (image channels, classes) of each dataset: enough to build its model without reading any data
DATASET_SHAPES = {"fmnist": (1, 10), "emnist": (1, 62), "cifar10": (3, 10), "cinic10": (3, 10),
                  "synthetic": (1, 10), "synthetic-rgb": (3, 10)}


def dataset_present(name: str, data_dir: str | Path | None = None) -> bool:
    """Whether ``name``'s files are where its loader looks (a cheap check: nothing is read or validated)."""
    root = Path(data_dir or ".")
    expected = {
        "fmnist": [root / "fashion-mnist" / "train-images-idx3-ubyte", FMNIST_DIR / "train-images-idx3-ubyte"],
        "emnist": [root / "EMNIST" / "raw" / "emnist-byclass-train-images-idx3-ubyte"],
        "cifar10": [root / "cifar-10-batches-py" / "data_batch_1"],
        "cinic10": [root / "CINIC-10" / "train"],
    }
    if name not in expected:
        return name in DATASETS  # the synthetic sets are made, never read
    return any(path.exists() or path.with_name(path.name + ".gz").exists() for path in expected[name])


def load_dataset(name: str, data_dir: str | Path | None = None) -> ImageDataset:
    """Load a dataset by name (one of :data:`DATASETS`) from local files; never downloads."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return DATASETS[name](Path(data_dir) if data_dir else None)


# --------------------------------------------------------------------------- augmentation

def draw_crop_flip(n: int, generator: torch.Generator, padding: int = 4) -> tuple[torch.Tensor, ...]:
    """Random-crop offsets and flip flags for ``n`` images: (dy, dx, flip), each (n,), on the CPU."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return dy, dx, flip


def apply_crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                    padding: int = 4) -> torch.Tensor:
    """Crop each image (zero padding ``padding``, same size) at (dy, dx) and flip it where ``flip``.

    images (n, C, H, W); dy, dx, flip (n,) on any device.
    """
    n, c, h, w = images.shape
    dev = images.device
    dy, dx, flip = dy.to(dev), dx.to(dev), flip.to(dev)
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    rows = dy[:, None] + torch.arange(h, device=dev)  # (n, H)
    cols = dx[:, None] + torch.arange(w, device=dev)  # (n, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx = torch.arange(n, device=dev)[:, None, None]
    return padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)  # (n, C, H, W)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip per image of a batch (n, C, H, W).

    Draws come from ``generator`` (CPU) in a fixed order (dy, dx, flip), so
    engines drawing from the same generator get the same crops.
    """
    return apply_crop_flip(images, *draw_crop_flip(images.shape[0], generator, padding), padding)
