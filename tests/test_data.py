"""Dataset loading: real Fashion-MNIST files, clear errors for missing/malformed files, augmentation."""
import gzip

import numpy as np
import pytest
import torch

from hyperfl_fast.data import (FMNIST_DIR, DatasetError, load_dataset, make_synthetic, random_crop_flip,
                               read_idx)


@pytest.mark.skipif(not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (make test installs it)")
def test_real_fashion_mnist_loads():
    data = load_dataset("fmnist")
    assert data.train_images.shape == (60000, 1, 28, 28) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_labels).tolist() == [6000] * 10
    x = data.normalize(data.train_images[:1000])
    assert abs(x.mean().item() - (0.2860 - 0.1307) / 0.3081) < 0.05  # FMNIST's pixel mean is about 0.286


def test_idx_roundtrip_and_malformed(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in images.shape)
    good = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(good, "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(read_idx(good, "test"), images)
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(header + images.tobytes()[:-7])
    with pytest.raises(DatasetError, match="truncated or malformed"):
        read_idx(bad, "test")
    bad.write_bytes(b"not an idx file")
    with pytest.raises(DatasetError, match="not an IDX file"):
        read_idx(bad, "test")


@pytest.mark.parametrize("name,where", [("emnist", "EMNIST/raw/emnist-byclass-train-images-idx3-ubyte"),
                                        ("cifar10", "cifar-10-batches-py/data_batch_1"),
                                        ("cinic10", "CINIC-10/train/airplane")])
def test_missing_dataset_names_dataset_and_path(name, where, tmp_path):
    with pytest.raises(DatasetError) as err:
        load_dataset(name, tmp_path)
    assert err.value.args[0].startswith(name) and str(tmp_path / where) in str(err.value)
    assert "Place" in str(err.value)


def test_malformed_cifar_is_a_clear_error(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="data_batch_1 is malformed"):
        load_dataset("cifar10", tmp_path)


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")


def test_synthetic_is_fixed_and_class_dependent():
    a, b = make_synthetic(1), make_synthetic(1)
    assert torch.equal(a.train_images, b.train_images)
    means = torch.stack([a.train_images[a.train_labels == c].float().mean(0) for c in range(10)])
    assert (means[0] - means[1]).abs().mean() > 10  # classes differ in their pattern


def test_random_crop_flip_is_a_shifted_window():
    x = torch.randn(16, 3, 8, 8)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == x.shape
    for img, src in zip(out, x):
        padded = torch.nn.functional.pad(src, (2, 2, 2, 2))
        windows = [padded[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        assert any(torch.equal(img, w) or torch.equal(img, w.flip(-1)) for w in windows)
    same = random_crop_flip(x, torch.Generator().manual_seed(0), padding=2)
    assert torch.equal(out, same)
