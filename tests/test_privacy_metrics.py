"""PSNR / SSIM on known cases, and the matching of reconstructions to ground truth."""
import math

import pytest
import torch

from hyperfl_fast.privacy.metrics import match_to_ground_truth, psnr, ssim


def test_identical_images():
    x = torch.rand(3, 1, 16, 16)
    assert torch.isinf(psnr(x, x)).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(3))


def test_psnr_of_a_known_noise_level():
    x = torch.rand(2, 3, 32, 32)
    noise = torch.full_like(x, 0.1) * torch.sign(torch.randn_like(x))  # MSE exactly 0.01
    torch.testing.assert_close(psnr(x + noise, x), torch.full((2,), 20.0))  # 10 log10(1 / 0.01)
    assert math.isclose(psnr(x * 0 + 0.5, x * 0 + 0.25, data_range=1.0)[0].item(), 10 * math.log10(1 / 0.0625),
                        rel_tol=1e-6)


def test_ssim_decreases_with_noise_and_is_symmetric():
    x = torch.rand(1, 1, 28, 28)
    small, large = x + 0.02 * torch.randn_like(x), x + 0.3 * torch.randn_like(x)
    assert 1.0 > ssim(small, x).item() > ssim(large, x).item()
    torch.testing.assert_close(ssim(small, x), ssim(x, small))
    assert ssim(x, 1 - x).item() < -0.9  # inverted structure: strongly negative


def test_matching_finds_the_best_permutation():
    truth = torch.rand(4, 1, 8, 8)
    recon = truth[[2, 0, 3, 1]] + 0.01 * torch.randn(4, 1, 8, 8)
    matched = match_to_ground_truth(recon, truth)
    assert (psnr(matched, truth) > 30).all()


def test_lpips_from_local_weight_files(tmp_path, lpips_weight_files):
    """LPIPS loads only from files the user provides (random ones here): 0 for identical images, > 0 otherwise."""
    from hyperfl_fast.privacy.lpips import LPIPS

    torch.manual_seed(0)
    alexnet_path, linear_path = lpips_weight_files
    metric = LPIPS(alexnet_path, linear_path)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(metric(x, x), torch.zeros(2))
    assert (metric(x, torch.rand(2, 1, 28, 28)) > 0).all()
    with pytest.raises(ValueError, match="weight file .* does not exist"):
        LPIPS(tmp_path / "missing.pth", linear_path)
