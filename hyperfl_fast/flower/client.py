"""One SuperNode's work as one client of the federation: what the ``ClientApp``'s handlers
(:mod:`.client_app`) do with a message once it needs training or data.

Its partition is ``partition-id`` of ``num-partitions`` (node config), split
exactly as ``python -m hyperfl_fast.train`` splits the data.  Its private
state (HyperFL: embedding and classifier) starts from the same seeded draw as
the in-process engines and lives in ``Context.state`` between rounds and in
:func:`state_file` (so a restarted SuperNode carries on); it never leaves the
node.  Local training is the method's
:meth:`~hyperfl_fast.methods.Method.client_update`, the reference engine's
code, with round ``server-round - 1``, so every random draw is keyed by
(seed, round, client, epoch) just as in-process.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import ConfigError
from ..dp import ClientPrivacy
from ..federation import accuracy, build_clients, load_partition
from ..methods import get_method
from .settings import (EVALUATE_RECEIVED, ROUNDS_BY_PARTITION, STATE_RUN_ID, node_partition, refuse_keyed_noise,
                       settings_from_run_config)

PRIVATE = "private"  # Context.state: the client's private arrays
PROGRESS = "progress"  # Context.state: rounds trained so far (for the privacy accountant and the audit)
# Node config: where the node keeps its private state on disk (it survives a restart of the SuperNode),
# whether a node whose state is gone may start again from the seeded start (its privacy accounting restarts),
# and whether it checks what it receives (--psi-check) whatever the server's run config says: the check guards
# against the server, so the node's own word turns it on.
STATE_DIR, FRESH_START, PSI_CHECK = "state-dir", "fresh-start", "psi-check"
STATE_DIR_ENV = "HYPERFL_NODE_STATE_DIR"  # the default state-dir (Flower's simulation gives no node config)
DEFAULT_STATE_DIR = Path.home() / ".local" / "state" / "hyperfl_fast" / "flower"


@lru_cache(maxsize=2)
def _federation(run_config: tuple):
    """(settings, dataset, splits, spec, every client's initial private state) of a run, built once per process:
    the split and the seeded draw of the in-process engines, of which each node keeps its own part.  In the
    Simulation Engine one process serves many virtual nodes, so this is shared by all of them."""
    settings = settings_from_run_config(dict(run_config))
    cfg = settings.cfg
    dataset, splits, spec = load_partition(cfg, log=lambda _: None)
    torch.manual_seed(cfg.seed)
    _, privates = get_method(cfg.method).init_states(spec, cfg.clients, cfg, cfg.torch_device())
    return settings, dataset, splits, spec, privates


@lru_cache(maxsize=1024)  # every virtual node a simulation process serves (a client's data: a few MB at most)
def _client(run_config: tuple, partition_id: int):
    """(settings, spec, this client's data, its initial private state)."""
    settings, dataset, splits, spec, privates = _federation(run_config)
    data = build_clients(dataset, [splits[partition_id]], settings.cfg.torch_device())[0]
    return settings, spec, dataclasses.replace(data, client_id=partition_id), privates[partition_id]


def client_of(context: Context) -> tuple:
    """This node's (settings, spec, data, initial private state); checks its node config against the run."""
    partition_id, partitions = node_partition(context)
    settings, spec, data, initial = _client(tuple(sorted(context.run_config.items())), partition_id)
    if partitions != settings.cfg.clients or not 0 <= partition_id < partitions:
        raise ConfigError(f"node config: partition-id {partition_id} of num-partitions {partitions} does not fit "
                          f"the run's clients={settings.cfg.clients}")
    return settings, spec, data, initial


def private_state(context: Context, initial: dict) -> dict:
    """The private state kept in ``Context.state`` (the seeded start before the first round)."""
    if PRIVATE in context.state:
        return context.state[PRIVATE].to_torch_state_dict()
    return initial


def rounds_trained(context: Context) -> int:
    return int(context.state[PROGRESS]["rounds"]) if PROGRESS in context.state else 0


def state_file(context: Context, run_id: int | None = None) -> Path:
    """The node's private state on disk: ``<state-dir>/run-<run id>/partition-<id>.pt`` (node config state-dir,
    else $HYPERFL_NODE_STATE_DIR, else ~/.local/state/hyperfl_fast/flower), where the run id is the one the
    server says (``state-run-id``: a resumed run's is the first run's), else this run's."""
    folder = Path(str(context.node_config.get(STATE_DIR) or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR))
    folder = folder.expanduser()
    run = context.run_id if run_id is None else run_id
    return folder / f"run-{run}" / f"partition-{node_partition(context)[0]}.pt"


def save_private(context: Context, run_id: int | None = None) -> None:
    """Write ``Context.state``'s private arrays and rounds to :func:`state_file`, atomically, with a digest; the
    state of the round before stays beside it (``.previous.pt``), for :func:`restore_private` to go back to.  A
    file of the same round (a round trained again after going back) is replaced, keeping the one before."""
    path = state_file(context, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and int(load_state(path)["rounds"]) == rounds_trained(context) - 1:
        os.replace(path, previous_file(path))
    save_checkpoint(path, {"run-id": context.run_id if run_id is None else run_id, "rounds": rounds_trained(context),
                           "private": context.state[PRIVATE].to_torch_state_dict()})


def previous_file(path: Path) -> Path:
    return path.with_suffix(".previous.pt")


def load_state(path: Path) -> dict:
    """One saved private state, verified; a damaged file is one line naming it."""
    return load_checkpoint(path, torch.device("cpu"), f"delete it and start the node with node config "
                           f"{FRESH_START}=true", required=("run-id", "rounds", "private", "sha256"))[0]


def saved_states(path: Path) -> list[dict]:
    """The private states saved at ``path`` and before it, latest first (an interrupted save can leave only the
    one before)."""
    return [load_state(p) for p in (path, previous_file(path)) if p.exists()]


def restore_private(context: Context, rounds_before: int | None, run_id: int | None = None) -> None:
    """Make ``Context.state`` the private state to go on from, as the server sees it.

    ``rounds_before`` (sent with every train message; None for evaluation) is how many rounds the server has
    aggregated from this partition.  The state is the one in ``Context.state``, or after a restart the one in
    :func:`state_file` (``run_id``: as there).  A node that trained more rounds than that (its reply, or the
    server's record of it, was lost: a round-timeout, a SuperLink restart) goes back to its state after
    ``rounds_before`` rounds, since the lost round never reached the global state.  A node the server has
    aggregated from whose state is gone refuses to train, in one line, unless its node config says
    fresh-start=true: its embedding, classifier and privacy accounting are gone, and restarting them silently
    would misreport epsilon."""
    done = rounds_trained(context) if PROGRESS in context.state else None
    if done is not None and rounds_before in (None, done):
        return
    path = state_file(context, run_id)
    saved = saved_states(path)
    wanted = rounds_before if rounds_before is not None else (saved[0]["rounds"] if saved else 0)
    where = f"partition {node_partition(context)[0]} of run {context.run_id if run_id is None else run_id}"
    ahead = max([done or 0] + [int(s["rounds"]) for s in saved])
    if ahead > wanted:
        warnings.warn(f"node state: {where} trained {ahead} rounds, of which the server aggregated {wanted}: it goes "
                      f"on from its state after round {wanted}")
    match = next((s for s in saved if int(s["rounds"]) == wanted), None)
    if match is not None:
        context.state[PRIVATE] = ArrayRecord(match["private"])
        context.state[PROGRESS] = ConfigRecord({"rounds": wanted})
        return
    for key in (PRIVATE, PROGRESS):  # the seeded start
        context.state.pop(key, None)
    if wanted:
        if not context.node_config.get(FRESH_START, False):
            raise ConfigError(f"node state: {where} trained {wanted} rounds before, but its private state after "
                              f"them is not in {path} (the node restarted without it); to start it afresh, losing "
                              f"its embedding, classifier and privacy accounting, set node config {FRESH_START}=true")
        warnings.warn(f"node state: {where} starts afresh ({FRESH_START}=true); its privacy accounting restarts")


def received_state(msg: Message, device: torch.device) -> dict:
    """The global state a message carries (empty when the method has none)."""
    state = msg.content["arrays"].to_torch_state_dict() if "arrays" in msg.content else {}
    return {k: t.to(device) for k, t in state.items()}


def client_round(context: Context, global_state: dict, server_round: int,
                 run_id: int | None = None) -> tuple[dict, dict]:
    """One round of this node's local training: (its upload, its figures); its private state stays in
    ``context.state``."""
    settings, spec, data, initial = client_of(context)
    cfg, method = settings.cfg, get_method(settings.cfg.method)
    privacy = ClientPrivacy.from_config([data.num_train], cfg, first_client=data.client_id) if method.dp else None
    done = rounds_trained(context)
    private = private_state(context, initial)
    if (cfg.psi_check or context.node_config.get(PSI_CHECK, False)) and method.checks_received:
        reason = method.refusals(global_state, [private])[0]
        if reason:  # nothing is trained, nothing is replied: the server counts a failure
            raise ConfigError(f"partition {data.client_id} refused what the server sent in round {server_round} "
                              f"(psi-check): {reason}")
    update = method.client_update(spec, global_state, private, data, cfg, server_round - 1,
                                  privacy.client(0) if privacy else None)
    context.state[PRIVATE] = ArrayRecord({k: t.cpu() for k, t in update.private.items()})  # stays on the node
    context.state[PROGRESS] = ConfigRecord({"rounds": done + 1})
    save_private(context, run_id)
    metrics = {"num-examples": data.num_train, "partition-id": data.client_id, "train-loss": update.train_loss,
               "local-acc": update.local_acc, "rounds-before": done}
    if privacy:  # the epsilon this client has spent, by its own accountant over every round it trained
        privacy.accountants[0].step(privacy.steps_per_epoch[0] * cfg.local_epochs * (done + 1))
        metrics["epsilon"] = privacy.accountants[0].epsilon(cfg.delta)
    return {k: t.cpu() for k, t in update.upload.items()}, metrics


def client_evaluation(context: Context, received: dict) -> dict:
    """This node's figures with what the server sent after aggregating (the global state, or what it generated
    for this node): its test accuracy with its private part."""
    settings, spec, data, initial = client_of(context)
    model = get_method(settings.cfg.method).predict(spec, received, private_state(context, initial))
    return {"num-examples": len(data.test_y), "partition-id": data.client_id,
            "global-acc": accuracy(model, data.test_x, data.test_y, spec.eval_chunk)}


AGGREGATION_METRICS = ("num-examples", "partition-id")  # all a client sends besides its upload, by default


def replied_metrics(context: Context, metrics: dict) -> dict:
    """What of ``metrics`` leaves this node: only what aggregation needs (its upload's weight, and its partition
    id, which orders the aggregation and addresses pFedHN's messages), unless the run config opts in with
    client-metrics: then also its train loss, local and global test accuracy (computed on its private records
    without noise; their steps reveal its test-set size), rounds trained before, and for DP methods epsilon."""
    if not client_of(context)[0].client_metrics:
        return {k: v for k, v in metrics.items() if k in AGGREGATION_METRICS}
    return metrics


def train_reply(msg: Message, context: Context) -> Message:
    """Receive the global state, train, reply with the upload and the figures (see :func:`replied_metrics`)."""
    refuse_keyed_noise(client_of(context)[0].cfg)
    device = client_of(context)[2].train_x.device
    config, received = msg.content["config"], received_state(msg, device)
    aggregated, run_id = config.get(ROUNDS_BY_PARTITION), config.get(STATE_RUN_ID)
    restore_private(context, aggregated[node_partition(context)[0]] if aggregated else None, run_id)
    evaluated = client_evaluation(context, received) if config.get(EVALUATE_RECEIVED, False) else None
    upload, metrics = client_round(context, received, int(config["server-round"]), run_id)
    if evaluated:  # the previous round's aggregated state, with the private part it was trained with
        metrics["global-acc"] = evaluated["global-acc"]
    content = RecordDict({"metrics": MetricRecord(replied_metrics(context, metrics))})
    if upload:
        content["arrays"] = ArrayRecord(upload)
    return Message(content=content, reply_to=msg)


def evaluate_reply(msg: Message, context: Context) -> Message:
    """Reply with the client's test accuracy under the new global state."""
    device = client_of(context)[2].train_x.device
    restore_private(context, None, msg.content["config"].get(STATE_RUN_ID) if "config" in msg.content else None)
    metrics = replied_metrics(context, client_evaluation(context, received_state(msg, device)))
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
