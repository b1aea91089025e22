"""Secure aggregation (run config ``secure-aggregation = true``): Flower's SecAgg+, so that the server learns only
the weighted mean of a round's uploads and never one client's.

Without it a curious server sees each client's upload, and a one-step HyperFL upload gives away that client's
exact gradient with respect to its feature extractor (the heads' bias gradient is d theta).

- **Server** (:class:`SecureAggregation`): a round's train messages go through the four stages of Flower's
  ``SecAggPlusWorkflow`` (setup, share keys, collect masked vectors, unmask), run one by one.  The nodes train in
  the third; the server sums their masked, quantised uploads, and the masks cancel in the sum.  Each node's
  metrics (``num-examples``, ``partition-id``, and the figures a run opts into) still arrive in the clear.
- **Client** (:func:`secure_aggregation_mod`, a ClientApp mod): hands the protocol's messages to Flower's
  ``secaggplus_mod`` and translates between its legacy records (``fitins.*``, ``fitres.*``) and this app's.
- **Drop-outs.**  Flower's SecAgg+ removes the masks of a node lost after it shared its keys (while it trains,
  or while unmasking), as long as ``secagg-threshold`` of its shares remain.  A node lost during setup or key
  sharing leaves no shares, and Flower's unmask would fail: the server restarts the protocol without it
  (nothing has been trained yet).
- **Quantisation.**  A node scales its upload by its weight, ``num-examples`` over the run's local size (every
  client holds that many samples: the ratio is 1), clips it to +-``secagg-clipping-range`` and rounds it
  stochastically to one of 2^22 levels, so the mean is exact to within one step, 2 x range / 2^22 (3.8e-6 at the
  default 8).  A node whose upload exceeds the range refuses in one line instead of being clipped silently.
  The rounding draws from Flower's unseeded NumPy generator, so a secure run's global state is not reproducible
  bit for bit (a plain run's is).
- **Time.**  Each stage waits up to ``round-timeout`` for its replies, so a round with a silent node can take
  several times that; a node that dies is answered for by the SuperLink once its heartbeat lapses (about a
  minute).
- **Refusals.**  A reply the server would refuse (a foreign partition id) has its masked upload in the sum
  already: the round stops the run instead of aggregating.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from ..config import ConfigError
from .settings import FlowerSettings

ARRAY_NAMES = "array-names"  # a protocol train message's config: the names of the arrays it carries, in order
UPLOAD_NAMES = "upload-names"  # ... and of the arrays the node uploads, in the order the server sums them


@dataclass
class SecureRound:
    """What the server learns from one round of SecAgg+."""

    replies: list[Message]  # the replies that carried masked uploads: each node's metrics, no arrays
    mean: dict[str, np.ndarray] | None  # their weighted mean (float32); None when the protocol failed
    failed: list[str] = field(default_factory=list)  # who dropped out, where, and why


class _RecordingGrid:
    """The grid as the workflow sees it (it only sends and receives): keeps each stage's messages and replies,
    to name the nodes that dropped out."""

    def __init__(self, grid: Grid):
        self.grid, self.sent, self.replies = grid, [], []

    def send_and_receive(self, messages, timeout=None):
        self.sent = list(messages)
        self.replies = list(self.grid.send_and_receive(self.sent, timeout=timeout))
        return self.replies


class _HandOver(LegacyFedAvg):
    """The legacy strategy the workflow calls: it gives the workflow this round's fit instructions and keeps
    the mean the workflow unmasked (the workflow hands every result that mean as its parameters)."""

    def __init__(self, instructions: list):
        super().__init__()
        self.instructions, self.mean = instructions, None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return None, {}


class SecureAggregation:
    """The server's side of Flower's SecAgg+ for one run: :meth:`round` runs a round's train messages through
    it.  ``upload_keys``: the upload's names and shapes, in the order they are summed."""

    STAGES = ("setup", "share keys", "collect masked vectors", "unmask")

    def __init__(self, settings: FlowerSettings, upload_keys: dict[str, tuple[int, ...]], local_size: int):
        secure = settings.secure_aggregation
        self.upload_keys, self.min_clients = upload_keys, settings.min_clients
        # the weight of every upload (num-examples) is the run's local size: quantised with the full range
        self.workflow = SecAggPlusWorkflow(secure.shares, secure.threshold, max_weight=float(local_size),
                                           clipping_range=secure.clipping_range, timeout=settings.round_timeout)

    def round(self, grid: Grid, messages: list[Message], server_round: int,
              describe: Callable[[int], str]) -> SecureRound:
        """Run ``messages`` (one train message per node: its arrays and config) through SecAgg+; ``describe``
        names a node in failure lines."""
        grid, failed = _RecordingGrid(grid), []
        nodes = {m.metadata.dst_node_id: m for m in messages}
        lost = True
        while lost:  # a node lost before training left no shares of its keys: restart without it
            if len(nodes) < self.min_clients:
                return SecureRound([], None, failed)
            context, state = self.context(grid, nodes, server_round), WorkflowState()
            for stage, step in zip(self.STAGES[:2], (self.workflow.setup_stage, self.workflow.share_keys_stage)):
                step(grid, context, state)
                lost = self.dropped(grid, stage, describe)
                failed += lost.values()
                if lost:
                    nodes = {node: m for node, m in nodes.items() if node not in lost}
                    break
        unmasked = self.workflow.collect_masked_vectors_stage(grid, context, state)
        replies = [r for r in grid.replies if not r.has_error()]
        failed += self.dropped(grid, self.STAGES[2], describe).values()
        if unmasked:  # else too few shares are left for some node: Flower's check fails before unmasking
            unmasked = self.workflow.unmask_stage(grid, context, state)
            failed += self.dropped(grid, self.STAGES[3], describe).values()
        if not unmasked or context.strategy.mean is None:
            failed.append("secure aggregation: too few nodes remain to remove the masks (secagg-threshold); "
                          "nothing is unmasked")
            return SecureRound(replies, None, failed)
        mean = {name: np.asarray(array, dtype=np.float32).reshape(shape)
                for (name, shape), array in zip(self.upload_keys.items(), context.strategy.mean, strict=True)}
        return SecureRound(replies, mean, failed)

    def context(self, grid: _RecordingGrid, nodes: dict[int, Message], server_round: int) -> LegacyContext:
        """The workflow's context: the round and, through :class:`_HandOver`, each node's fit instruction (its
        message's arrays and config, with their names and the upload's)."""
        instructions, manager, serialised = [], SimpleClientManager(), {}
        for node, message in nodes.items():
            arrays = message.content["arrays"]  # the same global state for every node: serialised once
            if id(arrays) not in serialised:
                serialised[id(arrays)] = ndarrays_to_parameters(arrays.to_numpy_ndarrays())
            config = {**message.content["config"], ARRAY_NAMES: list(arrays.keys()),
                      UPLOAD_NAMES: list(self.upload_keys)}
            proxy = GridClientProxy(node, grid, run_id=0)  # only its node id is used
            manager.register(proxy)
            instructions.append((proxy, FitIns(serialised[id(arrays)], config)))
        state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
                            MAIN_PARAMS_RECORD: ArrayRecord()})
        return LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}),
                             strategy=_HandOver(instructions), client_manager=manager)

    @staticmethod
    def dropped(grid: _RecordingGrid, stage: str, describe: Callable[[int], str]) -> dict[int, str]:
        """The nodes the last stage lost (sent a message, no good reply), each with a line: its error reply's
        reason (an error for a dead node comes from the SuperLink: the message it answers names the node), or
        no reply."""
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in grid.sent}
        answered = {r.metadata.src_node_id for r in grid.replies if not r.has_error()}
        errors = {node_of.get(r.metadata.reply_to_message_id): r.error.reason for r in grid.replies if r.has_error()}
        return {node: f"secure aggregation, {stage}: {describe(node)}: {errors.get(node, 'no reply')}"
                for node in sorted(set(node_of.values()) - answered)}


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a train message of the SecAgg+ protocol goes to Flower's ``secaggplus_mod``, which trains
    (this app's train handler, through :func:`_in_app_records`) in the collect-masked-vectors stage and replies
    with the masked upload; every other message passes through."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, lambda fit, ctx: _in_app_records(fit, ctx, call_next))


def _in_app_records(fit: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """The protocol's fit instruction (``fitins.*``) as this app's train message, and its reply as the legacy
    fit result (``fitres.*``) that ``secaggplus_mod`` masks; the reply's metrics stay as they are."""
    config = fit.content.config_records["fitins.config"]
    arrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(fit.content.array_records["fitins.parameters"],
                                                                     keep_input=True))
    names, upload_names = list(config[ARRAY_NAMES]), list(config[UPLOAD_NAMES])
    fit.content = RecordDict({
        "arrays": ArrayRecord({name: Array(array) for name, array in zip(names, arrays, strict=True)}),
        "config": ConfigRecord({k: v for k, v in config.items() if k not in (ARRAY_NAMES, UPLOAD_NAMES)})})
    reply = call_next(fit, context)
    arrays = reply.content["arrays"]
    upload = dict(zip(arrays.keys(), arrays.to_numpy_ndarrays(), strict=True))
    metrics = reply.content["metrics"]
    check_quantisable(upload, int(metrics["num-examples"]), context.state.config_records[RECORD_KEY_STATE])
    parameters = ndarrays_to_parameters([upload[name] for name in upload_names])
    reply.content = RecordDict({
        "metrics": metrics,
        "fitres.parameters": compat.parameters_to_arrayrecord(parameters, keep_input=True),
        "fitres.num_examples": MetricRecord({"num_examples": int(metrics["num-examples"])}),
        "fitres.metrics": ConfigRecord({}),
        "fitres.status": ConfigRecord({"code": 0, "message": "Success"})})
    return reply


def check_quantisable(upload: dict[str, np.ndarray], num_examples: int, protocol: ConfigRecord) -> None:
    """Refuse, in one line, an upload that SecAgg+ would corrupt: its weight above the protocol's largest, or a
    weighted value beyond the clipping range (it would be clipped silently)."""
    max_weight, clipping_range = float(protocol["max_weight"]), float(protocol["clipping_range"])
    if num_examples > max_weight:
        raise ConfigError(f"secure aggregation: this node's {num_examples} training samples exceed the largest "
                          f"weight the protocol allows ({max_weight:g}, the run's local-size)")
    if not all(np.isfinite(array).all() for array in upload.values()):
        raise ValueError("secure aggregation: this node's upload is not finite (training diverged)")
    largest = max((float(np.abs(array).max()) for array in upload.values() if array.size), default=0.0)
    if largest * num_examples / max_weight > clipping_range:
        raise ConfigError(f"secure aggregation: this node's upload has values up to {largest:.3g}, beyond "
                          f"secagg-clipping-range={clipping_range:g}; raise secagg-clipping-range")
