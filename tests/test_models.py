"""Hypernetwork layout: flat theta splits into exactly the target CNN's tensors."""
import pytest
import torch
from torch.func import functional_call

from hyperfl_fast.models import GeneratedCNN, HyperNetwork, TargetCNN, cnn_spec, split_theta


@pytest.mark.parametrize("channels,classes,expected_p", [(1, 10, 115776), (3, 10, 106400), (1, 62, 115776)])
def test_theta_splits_into_target_cnn_shapes(channels, classes, expected_p):
    spec = cnn_spec(channels, classes)
    assert spec.num_feature_params == expected_p
    cnn = TargetCNN(spec)
    feature_params = {k: v for k, v in cnn.named_parameters() if not k.startswith("fc2.")}
    theta = torch.randn(spec.num_feature_params)
    views = split_theta(theta, spec)
    assert list(views) == list(feature_params)
    for name, tensor in views.items():
        assert tensor.shape == feature_params[name].shape, name
    # views tile theta exactly, in order, with no gap or overlap
    torch.testing.assert_close(torch.cat([t.flatten() for t in views.values()]), theta, rtol=0, atol=0)


@pytest.mark.parametrize("channels", [1, 3])
def test_generated_forward_equals_functional_call_of_plain_cnn(channels):
    torch.manual_seed(1)
    spec = cnn_spec(channels, 10)
    model = GeneratedCNN(spec, HyperNetwork(64, 128, spec.num_feature_params), torch.nn.Parameter(torch.randn(64)),
                         torch.nn.Linear(spec.hidden, 10))
    x = torch.randn(5, channels, spec.image_size, spec.image_size)
    theta = model.generate()
    tensors = {**split_theta(theta, spec), "fc2.weight": model.classifier.weight, "fc2.bias": model.classifier.bias}
    expected = functional_call(TargetCNN(spec), tensors, (x,))
    torch.testing.assert_close(model(x), expected)


def test_hypernetwork_is_one_linear_head_over_relu_hidden():
    hn = HyperNetwork(8, 16, 100)
    v = torch.randn(3, 8)
    torch.testing.assert_close(hn(v), torch.relu(v @ hn.fc.weight.T + hn.fc.bias) @ hn.heads.weight.T + hn.heads.bias)
    assert hn.heads.weight.shape == (100, 16)


def test_split_theta_rejects_wrong_length():
    with pytest.raises(ValueError, match="flat vector of 115776"):
        split_theta(torch.randn(10), cnn_spec(1, 10))
    with pytest.raises(ValueError, match="no target CNN for in_channels=2"):
        cnn_spec(2, 10)


@pytest.mark.parametrize("channels", [1, 3])
def test_batched_features_equal_per_client_features(channels):
    from hyperfl_fast.models import extract_features, extract_features_batched

    spec = cnn_spec(channels, 10)
    theta = torch.randn(3, spec.num_feature_params) * 0.05  # (N, P)
    x = torch.randn(3, 4, channels, spec.image_size, spec.image_size)  # (N, B, C, H, W)
    batched = extract_features_batched(x, split_theta(theta, spec), spec, path="torch")
    for n in range(3):
        torch.testing.assert_close(batched[n], extract_features(x[n], split_theta(theta[n], spec), spec))
