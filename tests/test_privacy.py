"""Privacy invariant: a HyperFL client uploads hypernetwork tensors only; aggregation is the weighted mean."""
import torch

from hyperfl_fast.engines import build_reference
from hyperfl_fast.federation import weighted_average
from hyperfl_fast.methods.hyperfl import client_model
from hyperfl_fast.models import cnn_spec

from conftest import small_federation


def test_upload_holds_only_hypernetwork_tensors(tiny_config):
    data, clients = small_federation()
    engine = build_reference(cnn_spec(1, 10), clients, tiny_config, torch.device("cpu"))
    model = client_model(engine.spec, engine.global_state(), engine.client_state(0))
    upload = model.upload()
    assert set(upload) == {"fc.weight", "fc.bias", "heads.weight", "heads.bias"} == set(engine.global_state())
    private = [model.embedding, *model.classifier.parameters()]
    for tensor in upload.values():
        for secret in private:
            assert tensor.data_ptr() != secret.data_ptr()
            assert tensor.shape != secret.shape or not torch.equal(tensor, secret)
    # uploads are copies: changing one does not touch the client's model
    upload["fc.bias"].add_(1.0)
    assert not torch.equal(upload["fc.bias"], model.hypernet.fc.bias)


def test_round_sends_only_hypernetwork_and_keeps_private_parts(tiny_config, monkeypatch):
    import hyperfl_fast.methods.base as base

    data, clients = small_federation()
    engine = build_reference(cnn_spec(1, 10), clients, tiny_config, torch.device("cpu"))
    seen = []
    real_average = base.weighted_average
    monkeypatch.setattr(base, "weighted_average", lambda ups, ws: seen.append((ups, ws)) or real_average(ups, ws))
    engine.run_round(0, [0, 2])
    uploads, weights = seen[0]
    assert len(uploads) == 2 and weights == [60, 60]
    hyper_keys = set(engine.global_state())
    assert all(set(u) == hyper_keys for u in uploads)
    torch.testing.assert_close(engine.global_state()["heads.bias"],
                               (uploads[0]["heads.bias"] + uploads[1]["heads.bias"]) / 2)


def test_weighted_average_is_weighted_by_data_size():
    a = {"w": torch.randn(3, 4)}
    b = {"w": torch.randn(3, 4)}
    avg = weighted_average([a, b], [100, 300])
    torch.testing.assert_close(avg["w"], 0.25 * a["w"] + 0.75 * b["w"])
