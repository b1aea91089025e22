"""The Flower run config (``[tool.flwr.app.config]``, overridable with ``flwr run --run-config``) as a Config.

Keys are the training CLI's flags without the dashes in front (``local-epochs``, ``client-init``, ...), plus the
federation's own: ``output-dir`` (where the server writes metrics; "" = runs/flower-<dataset>-<method>),
``min-clients`` (the fewest replies a round may aggregate; 0 = all ``clients``), ``round-timeout`` (seconds the
server waits for a round's replies), ``audit-uploads`` (write every received upload's keys and shapes),
``client-metrics`` (default false: a client sends only its upload, its data size and its partition id; with true
also its train loss, local and global test accuracy, rounds trained before and, for DP methods, epsilon: figures
computed on its private records without noise, whose accuracy steps reveal its test-set size; the server accounts
every DP client's epsilon itself from what it sees either way) and ``fold-evaluation`` (default true: with frac 1
the nodes evaluate the aggregated state when it arrives with the next train message instead of in a message of its
own, which saves a ClientApp process per node and round; the last round is evaluated by itself) and ``resume``
(default false: with true the server continues the run whose checkpoint, ``global.pt``, is in ``output-dir``, and
the nodes their private states of that run; after a SuperLink restart, for example).

Secure aggregation (``secure-aggregation``, default false; see :mod:`~hyperfl_fast.flower.secure_aggregation`):
with true the server learns only the weighted mean of the uploads (Flower's SecAgg+).  ``secagg-shares``: into
how many shares each node's keys are split (an integer, at least 3, or a float: that share of the round's nodes;
default 1.0, every node), ``secagg-threshold``: how many shares rebuild a key (an integer, or a float: that share
of ``secagg-shares``; default 0.5), ``secagg-clipping-range``: the largest magnitude an upload's values may have
(default 8.0; the mean is exact to one quantisation step, 2 x range / 2^22).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config, ConfigError

if TYPE_CHECKING:
    from flwr.app import Context

FEDERATION_KEYS = {"output-dir", "min-clients", "round-timeout", "audit-uploads", "client-metrics", "fold-evaluation",
                   "secure-aggregation", "secagg-shares", "secagg-threshold", "secagg-clipping-range", "resume"}
EVALUATE_RECEIVED = "evaluate-received"  # a train message's config: evaluate the received state before training
# a train message's config: how many rounds the server has aggregated from each partition (a restarted node
# whose private state is gone learns from it that it had one)
ROUNDS_BY_PARTITION = "rounds-by-partition"
# a train or evaluate message's config: the run id under which the nodes keep their private state (the first
# run's, when a run resumes another after the SuperLink restarted)
STATE_RUN_ID = "state-run-id"
OPTIONAL_SIZES = ("local_size", "test_size")  # 0 in the run config = the dataset's default
OPTIONAL_TEXTS = ("backbone", "backbone_weights", "adapters")  # "" in the run config = none


@dataclass(frozen=True)
class SecAggSettings:
    """Flower's SecAgg+ parameters (``SecAggPlusWorkflow``'s ``num_shares``, ``reconstruction_threshold``,
    ``clipping_range``): an int is a count, a float a proportion."""

    shares: int | float = 1.0
    threshold: int | float = 0.5
    clipping_range: float = 8.0


@dataclass
class FlowerSettings:
    """A run's training settings plus how the server runs the federation."""

    cfg: Config
    output_dir: Path
    min_clients: int  # a round whose replies are fewer stops the run
    round_timeout: float  # seconds
    audit_uploads: bool
    client_metrics: bool  # clients send their figures too (opt-in; see the module docs)
    fold_evaluation: bool = True  # evaluate with the next train message where every client trains every round
    secure_aggregation: SecAggSettings | None = None  # Flower's SecAgg+; None = plain aggregation
    resume: bool = False  # continue the run whose checkpoint is in output_dir


def settings_from_run_config(run_config: dict) -> FlowerSettings:
    """Validate a Flower run config; raises :class:`ConfigError` naming the first bad key."""
    # clients train one by one (the reference engine): the lockstep engine's settings do not apply
    fields = set(Config.field_names()) - {"output_dir", "cuda_graphs", "dispatch", "ops_path"}
    values = {}
    for key, value in run_config.items():
        name = key.replace("-", "_")
        if key in FEDERATION_KEYS:
            continue
        if name not in fields:
            raise ConfigError(f"run config: unknown key {key!r}")
        values[name] = None if (name in OPTIONAL_SIZES and value == 0) or (name in OPTIONAL_TEXTS and value == "") \
            else value
    try:
        cfg = Config(**values).validate()
    except ConfigError as exc:
        raise as_run_config_error(exc) from None
    min_clients = run_config.get("min-clients", 0) or cfg.clients
    if not isinstance(min_clients, int) or not 0 < min_clients <= cfg.clients:
        raise ConfigError(f"run config: min-clients must be an integer in [0, clients={cfg.clients}], "
                          f"got {min_clients!r}")
    timeout = run_config.get("round-timeout", 3600)
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"run config: round-timeout must be a positive number of seconds, got {timeout!r}")
    out = Path(run_config.get("output-dir") or f"runs/flower-{cfg.dataset}-{cfg.method}")
    secure = secagg_settings(run_config, cfg, min_clients) if run_config.get("secure-aggregation", False) else None
    return FlowerSettings(cfg, out, min_clients, float(timeout), bool(run_config.get("audit-uploads", False)),
                          bool(run_config.get("client-metrics", False)), bool(run_config.get("fold-evaluation", True)),
                          secure, bool(run_config.get("resume", False)))


def as_run_config_error(exc: ConfigError) -> ConfigError:
    """The training CLI's message names flags (--lr): over Flower the same settings are run-config keys."""
    return ConfigError("run config: " + re.sub(r"--([a-z][a-z0-9-]*)", r"\1", str(exc)))


def secagg_settings(run_config: dict, cfg: Config, min_clients: int) -> SecAggSettings:
    """The secagg-* keys, checked: the method's server must average the uploads (the protocol gives it only their
    weighted sum), a round needs two nodes, and Flower's own checks of the numbers, reworded to name the keys."""
    from flwr.server.workflow import SecAggPlusWorkflow

    from ..methods import get_method

    method = get_method(cfg.method)
    if not method.averages_uploads:
        raise ConfigError(f"run config: secure-aggregation = true needs a method whose server averages the uploads; "
                          f"{cfg.method}'s server " + ("receives none" if not method.uploads else
                                                       "needs each client's upload on its own"))
    if min_clients < 2:
        raise ConfigError("run config: secure-aggregation = true needs min-clients >= 2 (a sum of one upload is "
                          "that upload)")
    default = SecAggSettings()
    secure = SecAggSettings(run_config.get("secagg-shares", default.shares),
                            run_config.get("secagg-threshold", default.threshold),
                            run_config.get("secagg-clipping-range", default.clipping_range))
    try:
        if not isinstance(secure.clipping_range, (int, float)) or secure.clipping_range <= 0:
            raise ValueError("`clipping_range` must be a positive number.")
        SecAggPlusWorkflow(secure.shares, secure.threshold, clipping_range=float(secure.clipping_range))
    except (TypeError, ValueError) as exc:
        message = str(exc).replace("`num_shares`", "secagg-shares").replace(
            "`reconstruction_threshold`", "secagg-threshold").replace("`clipping_range`", "secagg-clipping-range")
        raise ConfigError(f"run config: {message}") from None
    return dataclasses.replace(secure, clipping_range=float(secure.clipping_range))


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, or a one-line error saying how to set them."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except (KeyError, ValueError):
        raise ConfigError("node config: set integer partition-id and num-partitions "
                          "(flower-supernode --node-config 'partition-id=0 num-partitions=20')") from None


def refuse_keyed_noise(cfg: Config) -> None:
    """The Flower app runs real federations: keyed DP noise (reproducible from the seed the server sends every
    client) would be no noise at all, so it is refused."""
    from ..methods import get_method

    if get_method(cfg.method).dp and cfg.dp_noise != "secure":
        raise ConfigError("run config: dp-noise \"keyed\" is reproducible from the run's seed, which every "
                          "client receives, so anyone could remove the noise; a Flower run uses dp-noise \"secure\"")
