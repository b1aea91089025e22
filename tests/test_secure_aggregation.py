"""Secure aggregation (Flower's SecAgg+) in one process: the server's strategy and the nodes' ClientApp, with a
grid that hands each message to its node's ClientApp as a SuperNode would.  The real deployment on loopback is in
test_flower.py."""
import copy
import uuid

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402

from hyperfl_fast.config import ConfigError  # noqa: E402
from hyperfl_fast.flower.client_app import app  # noqa: E402
from hyperfl_fast.flower.server_app import run_federation  # noqa: E402
from hyperfl_fast.flower.settings import settings_from_run_config  # noqa: E402

from test_flower import SETTINGS  # noqa: E402

STEP = 2 * 8.0 / 2 ** 22  # one quantisation step at the default secagg-clipping-range


class LocalGrid:
    """Three SuperNodes in this process.  ``drop = (round, stage, node)``: that node fails in that SecAgg+
    stage of that round (its ClientApp raises, or, in setup, it does not answer)."""

    def __init__(self, run_config: dict, tmp_path, drop=None):
        self.contexts = {101 + i: Context(run_id=1, node_id=101 + i, state=RecordDict(), run_config=run_config,
                                          node_config={"partition-id": i, "num-partitions": 3,
                                                       "state-dir": str(tmp_path / f"node{i}")})
                         for i in range(3)}
        self.drop, self.replies = drop, []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            msg.metadata._message_id = uuid.uuid4().hex  # as the SuperLink sets it
            protocol = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
            stage, node = protocol.get("stage"), msg.metadata.dst_node_id
            if self.drop == (int(msg.metadata.group_id or 0), stage, node):
                if stage != "setup":
                    replies.append(Message(Error(code=0, reason=f"ClientApp of node {node} crashed"), reply_to=msg))
                continue
            try:  # a copy, as if serialised: the workflow sends every node the same records in some stages
                replies.append(app(copy.deepcopy(msg), self.contexts[node]))
            except Exception as exc:  # noqa: BLE001 (as a SuperNode replies)
                replies.append(Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg))
        self.replies += replies
        return replies


def run(tmp_path, drop=None, **extra):
    run_config = {**{k.replace("_", "-"): v for k, v in SETTINGS.items()}, "output-dir": str(tmp_path / "out"),
                  "min-clients": 2, **extra}
    grid = LocalGrid(run_config, tmp_path, drop)
    return run_federation(grid, settings_from_run_config(run_config)), grid


def test_the_server_sees_only_the_mean_and_it_equals_plain_aggregation(tmp_path, server_identity):
    plain, _ = run(tmp_path / "plain", rounds=1)
    secure, grid = run(tmp_path / "secure", rounds=1, **{"secure-aggregation": True})
    assert set(secure) == set(plain)
    for name, tensor in plain.items():
        assert not torch.equal(secure[name], tensor)  # quantised
        torch.testing.assert_close(secure[name], tensor, rtol=0, atol=STEP)
    # no reply carried an array: the uploads arrived masked, as integers in the protocol's record
    assert grid.replies and all(not len(r) for m in grid.replies for r in m.content.array_records.values())
    masked = [m for m in grid.replies if Key.MASKED_PARAMETERS in m.content.config_records.get(RECORD_KEY_CONFIGS, {})]
    assert len(masked) == 3


@pytest.fixture
def uploads(monkeypatch):
    """Every upload a node computes, by (round, partition), recorded before the protocol masks it."""
    from hyperfl_fast.flower import client

    seen, train_reply = {}, client.train_reply

    def recording(msg, context):
        reply = train_reply(msg, context)
        key = (int(msg.content["config"]["server-round"]), int(reply.content["metrics"]["partition-id"]))
        seen[key] = reply.content["arrays"].to_torch_state_dict()
        return reply

    monkeypatch.setattr(client, "train_reply", recording)
    return seen


@pytest.mark.parametrize("stage", ["setup", "share_keys", "collect_masked_vectors", "unmask"])
def test_a_node_that_drops_out_in_any_stage(stage, tmp_path, server_identity, uploads):
    """Lost while it trains (or unmasks), Flower's SecAgg+ removes its masks; lost before, the server restarts
    the protocol without it.  Either way the run goes on, round 2's state is the mean of the uploads that made it
    (to one quantisation step), and the failure names the node."""
    import json

    got, _ = run(tmp_path, drop=(2, stage, 103), **{"secure-aggregation": True})
    survivors = [0, 1, 2] if stage == "unmask" else [0, 1]  # its masked upload is in before it fails to unmask
    assert sorted(pid for r, pid in uploads if r == 2) == survivors  # trained once each: no restart after training
    for name, tensor in got.items():
        mean = sum(uploads[2, pid][name] for pid in survivors) / len(survivors)  # equal data sizes
        torch.testing.assert_close(tensor, mean, rtol=0, atol=STEP)
    second = json.loads((tmp_path / "out" / "metrics.json").read_text())["rounds"][1]
    assert [c["client"] for c in second["clients"]] == survivors
    assert [f.split(":")[0] for f in second["failures"]] == [f"secure aggregation, {stage.replace('_', ' ')}"]
    assert "node 103 (partition 2)" in second["failures"][0]


@pytest.mark.parametrize("config, message", [
    ({"method": "pfedhn"}, "pfedhn's server needs each client's upload on its own"),
    ({"method": "local"}, "local's server receives none"),
    ({"min-clients": 1}, "needs min-clients >= 2"),
    ({"secagg-shares": 2}, "secagg-shares as an integer must be greater than 2"),
    ({"secagg-threshold": 1.5}, "secagg-threshold is a float, it must be greater than 0"),
    ({"secagg-clipping-range": 0}, "secagg-clipping-range must be a positive number"),
])
def test_bad_secure_aggregation_settings_are_one_line(config, message):
    with pytest.raises(ConfigError, match=message):
        settings_from_run_config({"dataset": "synthetic", "clients": 3, "secure-aggregation": True, **config})


def test_an_upload_beyond_the_clipping_range_is_refused_not_clipped(tmp_path, server_identity):
    from hyperfl_fast.flower.server_app import FederationError

    with pytest.raises(FederationError, match="collect masked vectors: node 101: ConfigError: secure "
                                              "aggregation: this node's upload has values up to .* beyond "
                                              "secagg-clipping-range=0.001; raise secagg-clipping-range"):
        run(tmp_path, rounds=1, **{"secure-aggregation": True, "secagg-clipping-range": 0.001})
