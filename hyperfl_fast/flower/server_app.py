"""The Flower ``ServerApp``: Flower's ``FedAvg`` strategy, aggregating with the method's own rule, plus what this
package adds.

- **The privacy invariant, checked on what arrives.**  Every reply's arrays
  must be exactly the method's upload (HyperFL: the hypernetwork's
  ``fc.weight``, ``fc.bias``, ``heads.weight``, ``heads.bias``); a reply
  carrying any other key is refused and counted as a failure.
- **A hook on each upload** (``on_upload(server_round, partition_id,
  arrays, received)``, ``received`` being what the server sent that node: the
  global state, or pFedHN's generated weights), for audits and attacks; with ``audit-uploads`` the server writes
  every upload's keys and shapes, and the figures sent with it, to ``uploads.jsonl``.
- **Aggregation by the method** (:meth:`~hyperfl_fast.methods.Method.aggregate`,
  the in-process engines' rule), over the replies in partition-id order.
- **The same files** as ``python -m hyperfl_fast.train``: the metrics
  (``metrics.json``, ``metrics.csv``), aggregated from the clients' reports,
  and after every round a checkpoint (``global.pt``, with a digest) in the
  engines' one layout, holding the server's state and no client state.
- **What is sent.**  The global state, or for a method whose server makes
  each client its own part (:meth:`~hyperfl_fast.methods.Method.send`:
  pFedHN's generated weights) only that part: the server asks every node its
  partition once (a query message), refuses a second node claiming the same
  one, and accepts a node's upload only as the partition it was sent.  For a
  method that steps per client (pFedHN's loop) the nodes train one after the
  other, in partition order, each sent what the server generates after the
  previous accepted upload's step (each node waited for up to ``round-timeout``).
- **Failures.**  The server waits ``round-timeout`` seconds for a round's
  replies, then aggregates those that arrived (by the method's rule: FedAvg's
  weighting by data size, or pFedHN's one step per client), provided there
  are at least ``min-clients``; each round's
  record lists the clients that failed.  With fewer, the run stops with an
  error naming the round, and the files keep the last complete round.
  Before each round the server waits until ``min-clients`` nodes are connected.
- **Secure aggregation** (``secure-aggregation = true``): the train phase is
  Flower's SecAgg+ (:mod:`~hyperfl_fast.flower.secure_aggregation`); the
  server then learns only the weighted mean of the uploads, and the replies it
  checks carry metrics and no arrays.
- **Resume** (``resume = true``): after a SuperLink restart, a new run continues
  from the checkpoint (its rounds counted on from the checkpoint's), and tells
  the nodes the first run's id, under which they keep their private states.
- **Reproducible aggregation.**  Replies are averaged in partition-id order,
  so a run's global state does not depend on which client answered first
  (and equals the in-process reference engine's bit for bit).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from logging import ERROR, INFO
from typing import Callable, Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from ..checkpoint import CheckpointError, check_writable, load_checkpoint, save_checkpoint
from ..config import Config, ConfigError
from ..data import DATASET_SIZES
from ..engines import STATE_FORMAT, check_state
from ..federation import ClientResult, layout_spec
from ..methods import Method, get_method
from ..dp import ClientPrivacy
from ..metrics import round_line, round_record, write_metrics
from ..runner import check_resumable
from .secure_aggregation import SecureAggregation, SecureRound
from .settings import (EVALUATE_RECEIVED, ROUNDS_BY_PARTITION, STATE_RUN_ID, FlowerSettings, as_run_config_error,
                       refuse_keyed_noise, settings_from_run_config)

# on_upload(server_round, partition_id, upload, received): a node's accepted upload and what it had been sent
UploadHook = Callable[[int, int, dict[str, torch.Tensor], dict[str, torch.Tensor]], None]


class FederationError(RuntimeError):
    """Too few clients replied in a round to go on."""


@dataclass
class TrainedRound:
    """A round whose uploads are aggregated, until it is recorded (when its aggregated state is evaluated)."""

    round: int
    trained: dict[int, dict]  # train reports by partition id
    seconds: float  # its train phase
    failed: list[str]
    epsilons: dict[int, float]  # every DP client's epsilon after it


def by_partition(replies: Iterable[Message]) -> dict[int, MetricRecord]:
    """The replies' metrics by the partition id they carry."""
    return {int(m.content["metrics"]["partition-id"]): m.content["metrics"] for m in replies}


def mean_metrics(records: list[RecordDict], weighting_key: str) -> MetricRecord:
    """The plain mean over clients of each reported figure (as the in-process log averages them), over the clients
    that report it."""
    metrics = [next(iter(r.metric_records.values())) for r in records]
    keys = dict.fromkeys(k for m in metrics for k in m if k not in (weighting_key, "partition-id"))
    return MetricRecord({k: sum(float(m[k]) for m in metrics if k in m) / sum(k in m for m in metrics) for k in keys})


class UploadAuditingFedAvg(FedAvg):
    """Flower's ``FedAvg`` strategy that checks every upload against the method's upload keys, shows each one to
    ``on_upload``, aggregates with the method's rule (weighted by ``num-examples``), tolerates missing replies
    down to ``min_clients`` and writes the run's metrics after every round."""

    def __init__(self, settings: FlowerSettings, upload_keys: dict[str, tuple[int, ...]],
                 on_upload: UploadHook | None = None, method: Method | None = None, run_id: int = 0):
        n = settings.min_clients
        super().__init__(fraction_train=settings.cfg.frac, fraction_evaluate=settings.cfg.frac, min_train_nodes=n,
                         min_evaluate_nodes=n, min_available_nodes=n, train_metrics_aggr_fn=mean_metrics,
                         evaluate_metrics_aggr_fn=mean_metrics)
        # the upload's layout (name -> shape, in the order it is sent) and the hook that sees each upload
        self.settings, self.cfg, self.upload_keys, self.on_upload = settings, settings.cfg, upload_keys, on_upload
        self.method = method or get_method(settings.cfg.method)
        self.spec = layout_spec(settings.cfg)
        self.partitions: dict[int, int] = {}  # node id -> partition id (methods that send each client its own part)
        self.node_partitions: dict[int, int] = {}  # node id -> the partition id its replies carried
        self.rounds_aggregated = [0] * settings.cfg.clients  # per partition: rounds its upload was aggregated
        self.sent: list[Message] = []  # this phase's messages
        self.current: dict[str, torch.Tensor] = {}  # the global state sent this round
        # DP methods: each client's privacy accounting, kept by the server from what it sees (data size, rounds)
        self.privacy: dict[int, ClientPrivacy] = {}
        self.sizes: dict[int, int] = {}  # ... and the data size it was built for
        self.rounds: list[dict] = []
        self.state_run_id = run_id  # the run under which the nodes keep their private state
        self.offset = 0  # rounds done before this run (a resumed run): Flower counts this run's from 1
        self.trained: dict[int, dict] = {}  # this round's train reports by partition id
        self.failed: list[str] = []
        self.started = self.evaluate_started = time.perf_counter()  # this round's train and evaluate phases
        # Clients evaluate only when they send their figures (client-metrics).  Evaluation folded into the next
        # train message: every client trains every round (frac 1), so the clients that would evaluate round r's
        # state are the ones that receive it to train round r + 1, and their private parts have not changed in
        # between.  Round r is then recorded when round r + 1's replies arrive; the last round is evaluated by an
        # evaluate message as usual.
        self.evaluates = settings.client_metrics
        # (not for a method that steps per client: the nodes after the first receive a state already stepped on)
        self.fold = (self.evaluates and settings.fold_evaluation and settings.cfg.frac == 1.0
                     and not self.method.steps_per_client)
        self.pending: TrainedRound | None = None  # the last trained round, until it is recorded
        # secure-aggregation: the train phase is Flower's SecAgg+, and the server learns only the mean upload
        self.secure = (SecureAggregation(settings, upload_keys, self.cfg.local_size or
                                         DATASET_SIZES[self.cfg.dataset][0])
                       if settings.secure_aggregation else None)
        self.secured: SecureRound | None = None  # this round's outcome
        self.stepped: list[Message] = []  # a method that steps per client: this round's accepted replies
        self.sent_to: dict[int, dict[str, torch.Tensor]] = {}  # partition -> what its node was sent, if its own

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        self.started, self.trained, self.failed = time.perf_counter(), {}, []
        self.current, self.sent_to = arrays.to_torch_state_dict(), {}
        config = ConfigRecord({**config, ROUNDS_BY_PARTITION: list(self.rounds_aggregated),
                               STATE_RUN_ID: self.state_run_id})
        if self.fold and self.pending:  # the nodes evaluate what they receive before they train on it
            config = ConfigRecord({**config, EVALUATE_RECEIVED: True})
        messages = super().configure_train(server_round, arrays, config, grid)
        if self.method.steps_per_client:  # the nodes train one after the other here; the strategy sends nothing more
            self.stepped = self.one_by_one(server_round, self.located(messages, grid), grid)
            return self.remember([])
        messages = self.addressed(messages, grid)
        if self.secure:  # the protocol sends and receives the train messages here; the strategy sends nothing more
            self.secured = self.secure.round(grid, messages, server_round, self.describe)
            self.failed += self.secured.failed
            self.report(server_round, self.secured.failed)
            return self.remember([])
        return self.remember(messages)

    def one_by_one(self, server_round: int, messages: list[Message], grid: Grid) -> list[Message]:
        """pFedHN's loop over Flower (a method that steps per client): the nodes train one after the other, in
        partition order, each sent what the server makes of the state the previous accepted upload left; each
        reply is checked and, when accepted, stepped on at once.  Returns the accepted replies."""
        accepted, logged = [], len(self.failed)
        for msg in sorted(messages, key=lambda m: self.partitions[m.metadata.dst_node_id]):
            self.sent = [self.for_partition(msg.metadata.dst_node_id, msg)]
            replies = grid.send_and_receive(self.sent, timeout=self.settings.round_timeout)
            for reply in self.screened(replies, "train"):
                taken = self.accept(server_round, reply)
                if taken is not None:
                    pid, upload, weight = taken
                    self.current = self.method.aggregate(self.current, [upload], [weight], [pid])
                    accepted.append(reply)
        self.report(server_round, self.failed[logged:])
        return accepted

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.offset
        if not self.evaluates or (self.fold and server_round < self.cfg.rounds):
            return self.remember([])  # no figures asked for, or evaluated with the next round's train messages
        self.evaluate_started = time.perf_counter()
        self.current = arrays.to_torch_state_dict()  # the aggregated state
        config = ConfigRecord({**config, STATE_RUN_ID: self.state_run_id})
        return self.remember(self.addressed(super().configure_evaluate(server_round, arrays, config, grid), grid))

    def remember(self, messages: list[Message]) -> list[Message]:
        """Keep what is sent: an error reply for a dead node comes from the SuperLink, and only the message it
        answers (its id is set when the grid pushes it) says which node failed."""
        self.sent = messages
        return messages

    def node_of(self, reply: Message) -> str:
        """Who a reply is from, in words: the node the answered message went to, and its partition if known."""
        return self.describe(next((m.metadata.dst_node_id for m in self.sent if m.metadata.message_id
                                   and m.metadata.message_id == reply.metadata.reply_to_message_id),
                                  reply.metadata.src_node_id))

    def describe(self, node: int) -> str:
        partition = self.partitions.get(node, self.node_partitions.get(node))
        return f"node {node}" + (f" (partition {partition})" if partition is not None else "")

    def addressed(self, messages: Iterable[Message], grid: Grid) -> list[Message]:
        """The messages as they leave: for a method whose server sends every client its own part
        (:meth:`~hyperfl_fast.methods.Method.send`: pFedHN's generated weights), each node's message carries only
        what was made for its partition (asked once per node with a query message); otherwise unchanged."""
        messages = list(messages)
        if not self.method.sends_per_client:
            return messages
        return [self.for_partition(m.metadata.dst_node_id, m) for m in self.located(messages, grid)]

    def located(self, messages: Iterable[Message], grid: Grid) -> list[Message]:
        """The messages to nodes whose partition is known: asked once per node with a query message; a node that
        does not answer, or claims a partition another node holds, is left out (and logged)."""
        messages = list(messages)
        unknown = [m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in self.partitions]
        if unknown:
            asked = [Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                             message_type=MessageType.QUERY) for node in unknown]
            for reply in grid.send_and_receive(asked, timeout=self.settings.round_timeout):
                if reply.has_error():
                    continue
                pid = int(reply.content["metrics"]["partition-id"])
                if pid in self.partitions.values() or not 0 <= pid < self.cfg.clients:
                    self.failed.append(f"node {reply.metadata.src_node_id} claims partition {pid}, which another "
                                       "node holds or the run does not have; left out")
                    continue
                self.partitions[reply.metadata.src_node_id] = pid
        located = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node not in self.partitions:
                self.failed.append(f"node {node} did not say which partition it holds; left out")
                continue
            located.append(msg)
        return located

    def for_partition(self, node: int, msg: Message) -> Message:
        """``msg`` for ``node``, carrying what the server makes of the current state for the node's partition."""
        sent = self.method.send(self.spec, self.current, self.partitions[node])
        if self.on_upload:  # the hook is shown what the node was sent
            self.sent_to[self.partitions[node]] = sent
        content = RecordDict({"arrays": ArrayRecord({k: t.contiguous() for k, t in sent.items()}),
                              "config": msg.content["config"]})
        return Message(content=content, dst_node_id=node, message_type=msg.metadata.message_type)

    def _check_replies(self, server_round: int, replies: Iterable[Message], phase: str) -> list[Message]:
        """The replies that carry results; failures (errors, timeouts, foreign arrays) are logged and counted."""
        replies = list(replies)
        logged = len(self.failed)
        good = self.screened(replies, phase)
        expected = max(self.min_train_nodes, len(replies))
        if len(good) < self.min_train_nodes:
            if phase == "train" and self.fold and self.pending:  # the previous round is complete: keep it
                self.record(self.pending, by_partition(good))
            raise FederationError(f"round {server_round}: {len(good)} {phase} replies of {expected}, fewer than "
                                  f"min-clients={self.min_train_nodes} ({'; '.join(self.failed) or 'timed out'}); "
                                  f"{self.kept()}")
        self.report(server_round, self.failed[logged:])
        return good

    def screened(self, replies: Iterable[Message], phase: str) -> list[Message]:
        """The replies to :attr:`sent` that carry results; each failure (an error, no reply, foreign arrays) is
        added to :attr:`failed`."""
        replies, good = list(replies), []
        answered = {msg.metadata.reply_to_message_id for msg in replies}
        for sent in self.sent:  # a node that died before its heartbeat lapsed sends nothing at all
            if sent.metadata.message_id and sent.metadata.message_id not in answered:
                self.failed.append(f"{phase}: {self.describe(sent.metadata.dst_node_id)}: no reply within "
                                   f"round-timeout={self.settings.round_timeout:g} s")
        for msg in replies:
            if msg.has_error():
                self.failed.append(f"{phase}: {self.node_of(msg)}: {msg.error.reason}")
                continue
            if "partition-id" in msg.content.metric_records.get("metrics", {}):
                self.node_partitions[msg.metadata.src_node_id] = int(msg.content["metrics"]["partition-id"])
            arrays = msg.content.array_records.get("arrays")
            keys = {name for record in msg.content.array_records.values() for name in record.keys()}
            allowed = set() if self.secure else set(self.upload_keys)  # securely, every array arrives masked
            if phase == "train" and keys != allowed:
                self.failed.append(f"train: node {msg.metadata.src_node_id} uploaded {sorted(keys)}, not only "
                                   f"{sorted(allowed)}; refused")
                continue
            if phase == "train" and not self.secure and any(tuple(arrays[k].shape) != shape
                                                            for k, shape in self.upload_keys.items()):
                self.failed.append(f"train: node {msg.metadata.src_node_id} uploaded arrays of other shapes than "
                                   "the model's; refused")
                continue
            good.append(msg)
        return good

    def kept(self) -> str:
        """What the output folder keeps when the run stops."""
        return f"{self.settings.output_dir} keeps " + (f"rounds 1-{len(self.rounds)}" if self.rounds else "no round")

    @staticmethod
    def report(server_round: int, failures: list[str]) -> None:
        """Log each failure, once."""
        for line in failures:
            log(INFO, "hyperfl_fast: round %s: %s", server_round, line)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        if self.secure:  # the replies that carried masked uploads, if the protocol unmasked their mean
            replies = self.secured.replies if self.secured.mean is not None else []
        if self.method.steps_per_client:  # checked, accepted and stepped on as they arrived (one_by_one); only an
            good = accepted = self.stepped  # accepted reply counts towards min-clients (it is already in the state)
            if len(accepted) < self.min_train_nodes:
                raise FederationError(f"round {server_round}: {len(accepted)} train replies accepted, fewer than "
                                      f"min-clients={self.min_train_nodes} ({'; '.join(self.failed) or 'timed out'}); "
                                      f"{self.kept()}")
        else:  # in partition order, not arrival order: FedAvg's float32 sum then does not depend on which came first
            good = sorted(self._check_replies(server_round, replies, "train"),
                          key=lambda msg: int(msg.content["metrics"]["partition-id"]))
            accepted, uploads, weights, senders = [], [], [], []
            for msg in good:
                taken = self.accept(server_round, msg)
                if taken is None:
                    continue
                accepted.append(msg)
                pid, upload, weight = taken
                if upload:
                    uploads.append(upload)
                    weights.append(weight)
                    senders.append(pid)
        if self.secure and len(accepted) < len(good):  # its masked upload is in the mean: nothing can take it out
            raise FederationError(f"round {server_round}: secure aggregation: a reply was refused, and its upload is "
                                  f"in the mean ({'; '.join(self.failed)}); {self.kept()}")
        if self.fold and self.pending:  # these replies carry the evaluation of the previous round's state
            self.record(self.pending, by_partition(accepted))
        self.pending = TrainedRound(server_round, self.trained, time.perf_counter() - self.started, list(self.failed),
                                    {pid: p.epsilons()[0] for pid, p in self.privacy.items()})
        if not self.evaluates:
            self.record(self.pending, {})
        metrics = mean_metrics([m.content for m in accepted], self.weighted_by_key)
        if not self.upload_keys:  # nothing is uploaded (local): the global state stays as it is
            return None, metrics
        if self.secure:
            mean = {name: torch.from_numpy(array) for name, array in self.secured.mean.items()}
            return ArrayRecord({**self.current, **mean}), metrics
        if self.method.steps_per_client:
            return ArrayRecord(self.current), metrics
        return ArrayRecord(self.method.aggregate(self.current, uploads, weights, senders)), metrics

    def accept(self, server_round: int, msg: Message) -> tuple[int, dict[str, torch.Tensor], int] | None:
        """A screened train reply's partition id, upload (in the order it was sent) and weight, with what the
        server keeps of it (the partition's report and rounds, DP accounting, the hook, the audit); None, and a
        failure, when its partition is not one it may answer for."""
        metrics = msg.content["metrics"]
        pid = int(metrics["partition-id"])
        if not 0 <= pid < self.cfg.clients:
            self.failed.append(f"train: node {msg.metadata.src_node_id} replied as partition {pid}, which the "
                               f"run (clients={self.cfg.clients}) does not have; refused")
            return None
        if self.method.sends_per_client and self.partitions.get(msg.metadata.src_node_id) != pid:
            self.failed.append(f"train: node {msg.metadata.src_node_id} replied as partition {pid}, not the "
                               f"{self.partitions.get(msg.metadata.src_node_id)} it was sent; refused")
            return None
        self.rounds_aggregated[pid] += 1
        self.trained[pid] = dict(metrics)
        arrays = msg.content.array_records.get("arrays")
        upload = arrays.to_torch_state_dict() if arrays is not None else {}
        upload = {k: upload[k] for k in self.upload_keys if k in upload}  # in the order it was sent
        if self.method.dp:  # one more round of DP-SGD steps for this client
            if pid not in self.privacy:
                self.sizes[pid] = int(metrics[self.weighted_by_key])
                self.privacy[pid] = ClientPrivacy.from_config([self.sizes[pid]], self.cfg, pid)
            self.privacy[pid].record_round([0])
        if self.on_upload:
            self.on_upload(server_round, pid, upload, self.sent_to.get(pid, self.current))
        if self.settings.audit_uploads:
            with open(self.settings.output_dir / "uploads.jsonl", "a") as audit:
                audit.write(json.dumps({"round": server_round, "partition-id": pid,
                                        "arrays": {k: list(t.shape) for k, t in upload.items()},
                                        "metrics": dict(metrics)}) + "\n")
        return pid, upload, int(metrics[self.weighted_by_key])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]):
        server_round += self.offset
        if not self.evaluates or (self.fold and server_round < self.cfg.rounds):
            return None  # recorded with the round's train replies, or when the next round's arrive
        good = self._check_replies(server_round, replies, "evaluate")
        self.record(self.pending, by_partition(good), time.perf_counter() - self.evaluate_started, self.failed)
        return super().aggregate_evaluate(server_round, good)

    def server_state(self, server_round: int) -> dict:
        """What the server needs to continue after ``server_round`` (this run's count), beyond the global state
        and the recorded rounds: for the checkpoint."""
        return {"state-run-id": self.state_run_id, "rounds-done": server_round + self.offset,
                "rounds-by-partition": list(self.rounds_aggregated),
                "pending": dataclasses.asdict(self.pending) if self.pending else None,
                "privacy": {pid: {"size": self.sizes[pid], "accountant": p.state_dict()}
                            for pid, p in self.privacy.items()}}

    def resume(self, rounds: list[dict], state: dict) -> None:
        """Continue from a checkpoint's recorded ``rounds`` and :meth:`server_state`."""
        self.rounds, self.offset = list(rounds), int(state["rounds-done"])
        self.state_run_id, self.rounds_aggregated = int(state["state-run-id"]), list(state["rounds-by-partition"])
        self.pending = TrainedRound(**state["pending"]) if state["pending"] else None
        if self.pending and not self.fold:  # resumed without folded evaluation: record it unevaluated
            self.record(self.pending, {})
        for pid, saved in state["privacy"].items():
            self.sizes[pid] = saved["size"]
            self.privacy[pid] = ClientPrivacy.from_config([saved["size"]], self.cfg, pid)
            self.privacy[pid].load_state_dict(saved["accountant"])

    def record(self, done: TrainedRound, evaluated: dict[int, MetricRecord], evaluate_seconds: float = 0.0,
               failed: list[str] | None = None) -> None:
        """``done``'s record from its train reports, the evaluation of its aggregated state (a client that did not
        evaluate it has no global accuracy; an evaluate phase of its own adds its seconds and, with its train
        phase's, its failures) and the clients' epsilons after it: appended to the metrics files and logged."""
        epsilons = done.epsilons
        def figure(metrics, key):  # a DP client reports no figures unless the run opts in
            return float(metrics[key]) if key in metrics else None

        results = [ClientResult(pid, figure(t, "train-loss"), figure(t, "local-acc"),
                                figure(evaluated.get(pid, {}), "global-acc"), epsilons.get(pid))
                   for pid, t in sorted(done.trained.items())]
        all_epsilons = [epsilons.get(pid, 0.0) for pid in range(self.cfg.clients)] if self.method.dp else None
        record = round_record(self.cfg, done.round - 1, results, done.seconds + evaluate_seconds, all_epsilons)
        record["failures"] = done.failed if failed is None else failed
        self.rounds.append(record)
        if done is self.pending:
            self.pending = None
        write_metrics(self.settings.output_dir, self.cfg, self.rounds)
        log(INFO, "hyperfl_fast: %s", round_line(self.cfg, record))


def initial_global_state(cfg: Config) -> dict[str, torch.Tensor]:
    """The server's starting state: the in-process engines' seeded draw (no data needed)."""
    torch.manual_seed(cfg.seed)
    shared, _ = get_method(cfg.method).init_states(layout_spec(cfg), cfg.clients, cfg,
                                                   torch.device("cpu"))
    return shared


def check_node_partitions(grid: Grid, settings: FlowerSettings) -> None:
    """Fail fast, in one line, when the SuperNodes split the data otherwise than the run: every node's
    num-partitions must equal the run's clients.  Asked only while fewer nodes are connected than a round needs
    (else Flower would wait for them forever, "minimum required: 20"), with one query message per node."""
    nodes = list(grid.get_node_ids())
    if not nodes or len(nodes) >= settings.min_clients:
        return
    asked = [Message(content=RecordDict({"config": ConfigRecord({})}), dst_node_id=node,
                     message_type=MessageType.QUERY) for node in nodes]
    clients = settings.cfg.clients
    for reply in grid.send_and_receive(asked, timeout=min(settings.round_timeout, 120)):
        if reply.has_error() or "num-partitions" not in reply.content["metrics"]:
            continue
        partitions = int(reply.content["metrics"]["num-partitions"])
        if partitions != clients:
            raise ConfigError(f"run config: clients={clients}, but SuperNode {reply.metadata.src_node_id} holds "
                              f"partition {int(reply.content['metrics']['partition-id'])} of num-partitions="
                              f"{partitions}; set clients={partitions} (flwr run --run-config 'clients={partitions}') "
                              f"or start the nodes with num-partitions={clients}")


def resumed_checkpoint(settings: FlowerSettings) -> dict | None:
    """With resume=true, the checkpoint in output-dir (verified, and written by a run of the same settings), or
    None (and a log line) when there is none; every problem is one line naming the file or the keys."""
    path = settings.output_dir / "global.pt"
    if not path.exists():
        log(INFO, "hyperfl_fast: resume: no checkpoint in %s; starting from round 1", settings.output_dir)
        return None
    saved, _ = load_checkpoint(path, torch.device("cpu"), "delete it to start afresh, or set another output-dir",
                               required=("config", "engine", "rounds", "flower", "sha256"))
    try:
        check_resumable(path, saved, settings.cfg, name=lambda field: field.replace("_", "-"))
    except ConfigError as exc:
        raise as_run_config_error(exc) from None
    expected = {"format": STATE_FORMAT, "method": settings.cfg.method, "global": initial_global_state(settings.cfg),
                "clients": []}
    try:  # e.g. a server state written by an earlier version of the method (other tensor names or shapes)
        check_state(saved["engine"], expected)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} does not fit this run's model ({(str(exc).splitlines() or [repr(exc)])[0]}); "
                              "delete it to start afresh, or set another output-dir") from None
    return saved


def run_federation(grid: Grid, settings: FlowerSettings, on_upload: UploadHook | None = None,
                   run_id: int = 0) -> dict:
    """Run ``settings.cfg.rounds`` rounds over the connected SuperNodes (with resume, those the checkpoint in
    output-dir has not done); returns the final global state.  ``run_id``: this run's Flower id, under which the
    nodes keep their private state (a resumed run keeps the first run's)."""
    cfg = settings.cfg
    check_writable(settings.output_dir)
    saved = resumed_checkpoint(settings) if settings.resume else None
    check_node_partitions(grid, settings)
    shared = saved["engine"]["global"] if saved else initial_global_state(cfg)
    method = get_method(cfg.method)
    # a client uploads (the change of) what it received: the global state, or what was generated for it
    upload_keys = {k: tuple(t.shape) for k, t in method.send(layout_spec(cfg), shared, 0).items()}
    strategy = UploadAuditingFedAvg(settings, upload_keys, on_upload, method, run_id)
    if saved:
        strategy.resume(saved["rounds"], saved["flower"])
        log(INFO, "hyperfl_fast: resumed %s after round %s", settings.output_dir / "global.pt", strategy.offset)

    def save_global(server_round: int, arrays: ArrayRecord) -> None:
        if server_round:  # the engines' layout; the clients' private states stay on their SuperNodes
            engine = {"format": STATE_FORMAT, "method": method.name, "global": arrays.to_torch_state_dict(),
                      "clients": []}
            save_checkpoint(settings.output_dir / "global.pt", {"config": cfg.to_dict(), "rounds": strategy.rounds,
                                                                 "engine": engine,
                                                                 "flower": strategy.server_state(server_round)})

    if strategy.offset >= cfg.rounds:
        log(INFO, "hyperfl_fast: %s has all %s rounds; nothing to do", settings.output_dir, cfg.rounds)
        return shared
    result = strategy.start(grid, ArrayRecord(shared), num_rounds=cfg.rounds - strategy.offset,
                            timeout=settings.round_timeout, evaluate_fn=save_global)
    return result.arrays.to_torch_state_dict() if result.arrays is not None else shared


class PromptGrid:
    """The ServerApp's grid, pulling replies every ``interval`` seconds where Flower's ``send_and_receive``
    sleeps 3 s between pulls (a SuperNode still polls every 3 s): a round's replies are seen up to 3 s sooner, per
    message exchange.  Everything else is the wrapped grid's."""

    def __init__(self, grid: Grid, interval: float = 0.25):
        self.grid, self.interval = grid, interval

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        waiting = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while waiting and (deadline is None or time.monotonic() < deadline):
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if waiting:
                time.sleep(self.interval)
        return replies

    def __getattr__(self, name: str):
        return getattr(self.grid, name)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """The ServerApp's entry point: settings from the run config, then the federation."""
    try:
        settings = settings_from_run_config(context.run_config)
        refuse_keyed_noise(settings.cfg)
        run_federation(PromptGrid(grid), settings, run_id=context.run_id)
    except (ConfigError, FederationError) as exc:  # one line first; Flower then logs the traceback and fails the run
        log(ERROR, "hyperfl_fast: %s", exc)
        raise
