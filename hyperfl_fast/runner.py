"""A whole training run: data, partition, engine, the round loop, checkpoints and metrics.

A checkpoint is written after every round (atomically, on a background thread
while the next round trains, see :class:`~hyperfl_fast.checkpoint.BackgroundWriter`),
so a crash loses the round in flight, plus the round before it only if the crash
falls while that round's checkpoint is still being written (a fraction of a
second); Ctrl-C waits for the write.  ``resume=True`` continues from it and, because every
random draw is keyed by (seed, round, client, epoch), gives the same result as
a run that never stopped.
"""
from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import ops
from .checkpoint import BackgroundWriter, CheckpointError, check_writable, load_checkpoint
from .config import Config, ConfigError
from .data import DATASET_SIZES
from .dp import NOT_PRIVATE_EPSILON, BudgetTooSmall, dp_steps, noise_multiplier, sample_rate
from .engines import build_engine
from .federation import build_clients, load_partition, sample_clients
from .methods import get_method
from .metrics import RANDOM_BACKBONE, privacy_claims, round_line, round_record, write_metrics
from .progress import progress_bar

# settings a run may change when it resumes (every engine saves the same state, so the engine is one of them)
RESUME_MAY_CHANGE = {"rounds", "device", "output_dir", "data_dir", "precision", "cuda_graphs", "dispatch", "ops_path",
                     "engine", "psi_check"}
# settings older checkpoints lack, with the behaviour those runs had
LEGACY_DEFAULTS = {"client_init": "independent", "poisson": False, "dp_noise": "keyed", "psi_check": False}
# settings that only DP methods read (a non-DP run resumes whatever they say)
DP_ONLY = {"dp_noise"}


@dataclass
class RunResult:
    """The figures of a finished run."""

    config: Config
    rounds: list[dict] = field(default_factory=list)  # one entry per round, as in metrics.json
    output_dir: Path | None = None

    @property
    def final(self) -> dict:
        return self.rounds[-1]


def output_dir_for(cfg: Config) -> Path:
    return Path(cfg.output_dir or f"runs/{cfg.dataset}-{cfg.method}")


def prepare(cfg: Config, log: Callable[[str], None] = print):
    """Load the data, partition it and build the engine (errors here come before any training)."""
    device = cfg.torch_device()
    dataset, splits, spec = load_partition(cfg, log)
    return build_engine(spec, build_clients(dataset, splits, device), cfg, device), device


class TrainingDiverged(RuntimeError):
    """A round produced a non-finite loss or non-finite parameters; nothing of it was saved."""


class EveryClientRefused(TrainingDiverged):
    """Every sampled client refused what the server sent (``--psi-check``); nothing of the round was saved."""


def check_resumable(path: Path, state: dict, cfg: Config, name: Callable[[str], str] = str) -> None:
    """A :class:`ConfigError` unless the checkpoint ``state`` (read from ``path``) may continue as run ``cfg``;
    ``name`` spells a setting's field name as the caller's users know it."""
    saved = state["config"]
    may_change = RESUME_MAY_CHANGE if get_method(cfg.method).dp else RESUME_MAY_CHANGE | DP_ONLY
    changed = [name(k) for k in Config.field_names()
               if k not in may_change and saved.get(k, LEGACY_DEFAULTS.get(k)) != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"--resume: {path} was written with different settings ({', '.join(changed)}); "
                          "use the same flags or another --output-dir")
    if get_method(cfg.method).dp and saved.get("rounds") != cfg.rounds:
        raise ConfigError(f"--resume: {path} was written with --rounds {saved.get('rounds')}, and {cfg.method} "
                          "derives its noise from the rounds (the privacy budget covers the whole run); resume "
                          "with the same --rounds")


def _non_finite(record: dict, engine) -> str | None:
    """What is not finite after a round (the loss, or which parameters), or None when all is well."""
    if not math.isfinite(record["train_loss"]):
        return f"training loss {record['train_loss']}"
    tensors = {}

    def collect(prefix, obj):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point():
                tensors[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                collect(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                collect(f"{prefix}[{i}]", v)

    collect("", engine.state_dict())
    finite = torch.stack([t.isfinite().all() for t in tensors.values()]).cpu()  # one sync per round
    bad = [name for name, ok in zip(tensors, finite.tolist()) if not ok]
    return f"parameters {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}" if bad else None


def check_privacy_budget(cfg: Config, log: Callable[[str], None] = print) -> None:
    """DP methods, before any data is read: a budget no noise multiplier can meet is a ConfigError naming the flags;
    a budget that protects little (epsilon > 100, delta >= 1/n) or keyed noise is a warning."""
    method = get_method(cfg.method)
    if not method.dp:
        return
    n = cfg.local_size or DATASET_SIZES.get(cfg.dataset, (None,))[0]
    if n is None:
        return
    try:
        noise_multiplier(cfg.epsilon, cfg.delta, sample_rate(n, cfg.batch_size),
                         dp_steps(n, cfg.batch_size, cfg.rounds, cfg.local_epochs))
    except BudgetTooSmall as exc:
        raise ConfigError(f"--epsilon {cfg.epsilon:g}: {exc}; raise --epsilon or --delta, or lower --rounds or "
                          "--local-epochs") from None
    if cfg.epsilon > NOT_PRIVATE_EPSILON:
        log(f"warning: --epsilon {cfg.epsilon:g} is effectively not private (above {NOT_PRIVATE_EPSILON:g}, "
            "the guarantee bounds nothing an attacker cares about)")
    if cfg.delta >= 1 / n:
        log(f"warning: --delta {cfg.delta:g} is at least 1/n = {1 / n:.2g} (n = {n} samples per client): a "
            "mechanism that publishes one record outright meets it; use delta well below 1/n")
    if cfg.dp_noise == "keyed":
        log("warning: --dp-noise keyed: the noise is reproducible from --seed and can be subtracted from every "
            "upload; this run is NOT private (a setting for checks and simulation)")
    log(f"{cfg.method}: epsilon {privacy_claims(cfg)['epsilon_is']}; what it covers: {method.dp_guarantee}")


def completed_rounds(out: Path) -> int:
    """How many rounds the run in ``out`` has saved (0 if none)."""
    try:
        return len(json.loads((out / "metrics.json").read_text())["rounds"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def run(cfg: Config, resume: bool = False, overwrite: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Train ``cfg.rounds`` rounds, logging one line per round; returns every round's figures.

    ``resume`` continues the run in the output folder from its checkpoint;
    ``overwrite`` replaces another run's results there (without either, such a
    folder is refused).  Raises :class:`ConfigError` (bad settings, output
    folder, checkpoint) before any training, and :class:`TrainingDiverged` when
    a round's loss or parameters stop being finite (the last good round stays saved).
    """
    cfg.validate()
    try:
        ops.DISPATCH.set_overrides(cfg.ops_path)
        ops.DISPATCH.set_mode(cfg.dispatch)
        ops.DISPATCH.check_environment()
    except ValueError as exc:  # HYPERFL_OPS_PATH or HYPERFL_DISPATCH is malformed
        raise ConfigError(str(exc)) from None
    check_privacy_budget(cfg, log)
    device = cfg.torch_device()
    forced = ops.DISPATCH.current_overrides()
    if "triton" in forced.values() and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("the triton ops path needs a CUDA device (or TRITON_INTERPRET=1 to interpret the kernels "
                          "on the CPU, for checking only)")
    out = output_dir_for(cfg)
    check_writable(out)
    checkpoint = out / "checkpoint.pt"
    if checkpoint.with_suffix(".tmp").exists():
        checkpoint.with_suffix(".tmp").unlink()
        log(f"note: removed {checkpoint.with_suffix('.tmp')}, left by an interrupted checkpoint write")
    state = None
    if resume and checkpoint.exists():
        state, verified = load_checkpoint(checkpoint, cfg.torch_device())
        check_resumable(checkpoint, state, cfg)
        if not verified:
            log(f"note: {checkpoint} predates checkpoint digests; its integrity cannot be verified")
    elif resume:
        log(f"note: --resume: no checkpoint in {out}; starting from round 1")
    elif not overwrite and (checkpoint.exists() or (out / "metrics.json").exists()):
        raise ConfigError(f"--output-dir {out} holds another run's results; pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --output-dir")
    ops.set_precision(cfg.precision)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms per shape, as the measured dispatch does
    if cfg.ops_path or forced:
        ops_paths = f"forced {cfg.ops_path or os.environ.get(ops.ENV_VAR)}"
    else:
        ops_paths = f"dispatch {cfg.dispatch}" if device.type == "cuda" else "torch (CPU)"
    ops_paths += f"; precision {cfg.precision}"
    engine, device = prepare(cfg, log)
    ops.DISPATCH.reset_stats()
    rounds: list[dict] = []
    if state is not None:
        try:
            engine.load_state_dict(state["engine"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointError(f"{checkpoint} does not fit this run's model ({str(exc).splitlines()[0][:120]}); "
                                  "delete it to start afresh, or pass another --output-dir") from None
        rounds = state["rounds"]
        log(f"resumed from {checkpoint} after round {len(rounds)}")
    log(f"{cfg.method} on {cfg.dataset}: {cfg.clients} clients, frac {cfg.frac}, {cfg.rounds} rounds, "
        f"engine {cfg.engine}, device {device}; ops: {ops_paths}"
        + ("; steps: CUDA graphs" if cfg.cuda_graphs else "")
        + (f"; backbone {cfg.backbone}, " + (f"weights from {cfg.backbone_weights}" if cfg.backbone_weights else
                                             RANDOM_BACKBONE) if cfg.backbone else ""))

    if cfg.psi_check and cfg.client_init == "shared":
        log("warning: --psi-check with --client-init shared: from the shared start most clients' hypernetwork hidden "
            "units die in round 1, so their weights stop depending on their embedding and they refuse every later "
            "round; use --client-init independent")
    first_round, writer = len(rounds), BackgroundWriter()
    try:
        _train(cfg, engine, rounds, first_round, out, checkpoint, writer, log)
    except BaseException:  # an interrupt or a divergence: the last finished round still reaches the disk
        try:
            writer.close()
        except Exception as exc:  # ... unless writing it fails, which must not hide why the run stopped
            log(f"warning: the last round's checkpoint could not be written ({exc})")
        raise
    writer.close()
    return RunResult(cfg, rounds, out)


def accepting_clients(engine, sampled: list[int], round_idx: int, log: Callable[[str], None]) -> list[int]:
    """The sampled clients that accept what the server sends them (``--psi-check``); each refusal is logged."""
    reasons = engine.method.refusals(engine.global_state(), [engine.client_state(c) for c in sampled])
    for cid, reason in zip(sampled, reasons):
        if reason:
            log(f"round {round_idx + 1}: client {cid} refused the hypernetwork it received: {reason}")
    accepted = [cid for cid, reason in zip(sampled, reasons) if not reason]
    if not accepted:
        raise EveryClientRefused(f"round {round_idx + 1}: every sampled client refused the hypernetwork (--psi-check); "
                              "run without --psi-check to train anyway")
    return accepted


def _train(cfg: Config, engine, rounds: list[dict], first_round: int, out: Path, checkpoint: Path,
           writer: BackgroundWriter, log: Callable[[str], None]) -> None:
    """The round loop: train, check, then hand the round's checkpoint and metrics to ``writer``."""
    for round_idx in range(len(rounds), cfg.rounds):
        start = time.perf_counter()
        sampled = sample_clients(cfg.clients, cfg.frac, cfg.seed, round_idx)
        if cfg.psi_check:
            sampled = accepting_clients(engine, sampled, round_idx, log)
        results = engine.run_round(round_idx, sampled, progress_bar(f"round {round_idx + 1}", engine.progress_unit))
        epsilons = engine.privacy.epsilons() if engine.privacy is not None else None  # every client, not only these
        record = round_record(cfg, round_idx, results, time.perf_counter() - start, epsilons)
        problem = _non_finite(record, engine)
        if problem:
            kept = f"{out} keeps rounds 1-{round_idx}" if round_idx else "no round was saved"
            flags = [f"--{name.replace('_', '-')} (now {getattr(cfg, name)})" for name in get_method(cfg.method).step_flags]
            advice = "a smaller " + (", ".join(flags[:-1]) + " or " + flags[-1] if len(flags) > 1 else flags[0])
            raise TrainingDiverged(f"round {round_idx + 1}: training diverged (non-finite {problem}); {kept}. "
                                   f"Try {advice}")
        rounds.append(record)
        finished = list(rounds)
        writer.submit(checkpoint, {"config": cfg.to_dict(), "engine": engine.state_dict(), "rounds": finished},
                      then=functools.partial(write_metrics, out, cfg, finished, ops.DISPATCH.stats()))
        log(round_line(cfg, record))
        if round_idx in (first_round, cfg.rounds - 1):  # which path each op took, after the first round and the last
            log(f"ops: {ops.DISPATCH.describe()}")
