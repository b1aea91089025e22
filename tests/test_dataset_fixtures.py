"""EMNIST, CIFAR-10 and CINIC-10 on small fixtures written in their exact on-disk layouts.

No such dataset can be downloaded here, so each test writes a few hundred
generated images the way torchvision (EMNIST, CIFAR-10) or the CINIC-10
release lays them out, then checks loading pixel for pixel, the partition and
a one-round training run.
"""
import dataclasses
import gzip
import pickle

import numpy as np
import pytest
import torch

from hyperfl_fast.data import CIFAR10_CLASSES, EMNIST_GROUPS, dataset_present, load_dataset
from hyperfl_fast.partition import partition
from hyperfl_fast.runner import run


def class_images(rng, labels, channels, size):
    """uint8 images (n, C, H, W) whose mean brightness depends on the label, plus noise."""
    base = (np.asarray(labels) * 37 % 200 + 20)[:, None, None, None]
    noise = rng.integers(-20, 21, (len(labels), channels, size, size))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def write_emnist(root, per_class_train=8, per_class_test=5):
    """torchvision's EMNIST byclass raw files (gzipped IDX): <root>/EMNIST/raw/emnist-byclass-*."""
    rng = np.random.default_rng(0)
    folder = root / "EMNIST" / "raw"
    folder.mkdir(parents=True)
    out = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(62), per_class).astype(np.uint8)
        images = class_images(rng, labels, 1, 28)[:, 0]
        write_idx(folder / f"emnist-byclass-{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"emnist-byclass-{split}-labels-idx1-ubyte.gz", labels)
        out[split] = images, labels
    return out


def write_cifar10(root, per_batch=40, test=100):
    """The python version of CIFAR-10 as torchvision leaves it: <root>/cifar-10-batches-py/."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = []
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        labels = [int(i % 10) for i in range(n)]
        images = class_images(rng, labels, 3, 32)
        with open(folder / name, "wb") as f:  # rows of 3072 bytes: the red plane, then green, then blue
            pickle.dump({"batch_label": name, "data": images.reshape(n, -1), "labels": labels}, f)
        written.append((images, labels))
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": list(CIFAR10_CLASSES)}, f)
    return written


def write_cinic10(root, train_per_class=20, test_per_class=10):
    """The CINIC-10 release layout: <root>/CINIC-10/{train,valid,test}/<class>/*.png."""
    from PIL import Image

    rng = np.random.default_rng(2)
    first = {}
    for split, per_class in (("train", train_per_class), ("valid", 2), ("test", test_per_class)):
        for label, name in enumerate(CIFAR10_CLASSES):
            folder = root / "CINIC-10" / split / name
            folder.mkdir(parents=True)
            images = class_images(rng, [label] * per_class, 3, 32)
            for i, img in enumerate(images):
                Image.fromarray(img.transpose(1, 2, 0)).save(folder / f"cifar10-{split}-{label * 1000 + i}.png")
            first.setdefault(split, {})[label] = images[0]
    return first


def test_emnist_fixture_loads_and_partitions_by_groups(tmp_path):
    written = write_emnist(tmp_path)
    assert dataset_present("emnist", tmp_path) and not dataset_present("cifar10", tmp_path)
    data = load_dataset("emnist", tmp_path)
    assert data.num_classes == 62 and data.train_images.shape == (496, 1, 28, 28)
    np.testing.assert_array_equal(data.train_images[:, 0].numpy(), written["train"][0])
    np.testing.assert_array_equal(data.test_labels.numpy(), written["test"][1])
    splits = partition(data.train_labels.numpy(), data.test_labels.numpy(), 62, data.class_groups, 3, 60, 30, 0.2)
    for client, split in enumerate(splits):  # clients 0, 1, 2: digits, upper case, lower case
        group = set(EMNIST_GROUPS[client])
        labels = data.train_labels[split.train].tolist()
        assert sum(label in group for label in labels) >= 0.8 * len(labels)
        assert len(set(labels) - group) > 0  # the IID share reaches other classes
    all_train = np.concatenate([s.train for s in splits])
    assert len(np.unique(all_train)) == len(all_train)  # disjoint training sets


def test_cifar10_fixture_loads_pixel_exact(tmp_path):
    written = write_cifar10(tmp_path)
    data = load_dataset("cifar10", tmp_path)
    assert data.train_images.shape == (200, 3, 32, 32) and data.test_images.shape == (100, 3, 32, 32)
    np.testing.assert_array_equal(data.train_images[40:80].numpy(), written[1][0])  # data_batch_2, in order
    np.testing.assert_array_equal(data.test_labels.numpy(), written[5][1])
    assert data.augment and data.in_channels == 3


def test_cinic10_fixture_loads_pixel_exact(tmp_path):
    first = write_cinic10(tmp_path)
    data = load_dataset("cinic10", tmp_path)
    assert data.train_images.shape == (200, 3, 32, 32) and data.test_images.shape == (100, 3, 32, 32)
    assert torch.bincount(data.train_labels).tolist() == [20] * 10
    for label in (0, 7):
        row = int(torch.nonzero(data.train_labels == label)[0])  # files are read in sorted order per class
        np.testing.assert_array_equal(data.train_images[row].numpy(), first["train"][label])


@pytest.mark.parametrize("dataset,write", [("emnist", write_emnist), ("cifar10", write_cifar10),
                                           ("cinic10", write_cinic10)])
def test_one_round_on_each_fixture(dataset, write, tiny_config, tmp_path):
    write(tmp_path / "data")
    sizes = {"emnist": (60, 30), "cifar10": (30, 20), "cinic10": (30, 20)}[dataset]
    cfg = dataclasses.replace(tiny_config, dataset=dataset, data_dir=str(tmp_path / "data"), clients=3,
                              local_size=sizes[0], test_size=sizes[1], rounds=1, output_dir=str(tmp_path / "run"))
    result = run(cfg, log=lambda _: None)
    assert len(result.final["clients"]) == 3
    assert 0.0 <= result.final["local_acc"] <= 100.0 and np.isfinite(result.final["train_loss"])
