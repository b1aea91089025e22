"""A whole training run: data, partition, engine, the round loop, checkpoints and metrics.

A checkpoint is written after every round (atomically), so a crash loses at
most the round in flight; ``resume=True`` continues from it and, because every
random draw is keyed by (seed, round, client, epoch), gives the same result as
a run that never stopped.
"""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import ops
from .batched import build_batched
from .config import HEADLINE, HEADLINE_NAMES, Config, ConfigError
from .data import load_dataset
from .federation import build_clients, sample_clients
from .models import cnn_spec
from .partition import partition
from .reference import build_reference

RESUME_MAY_CHANGE = {"rounds", "device", "output_dir", "data_dir"}
# settings older checkpoints lack, with the behaviour those runs had
LEGACY_DEFAULTS = {"client_init": "independent"}


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


def prepare(cfg: Config):
    """Load the data, partition it and build the engine (errors here come before any training)."""
    device = cfg.torch_device()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    local_size = cfg.local_size or dataset.local_size
    test_size = cfg.test_size or dataset.test_size
    try:
        splits = partition(dataset.train_labels.numpy(), dataset.test_labels.numpy(), dataset.num_classes,
                           dataset.class_groups, cfg.clients, local_size, test_size, cfg.iid_share, cfg.iid,
                           cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"{cfg.dataset}: {exc}") from None
    spec = cnn_spec(dataset.in_channels, dataset.num_classes)
    clients = build_clients(dataset, splits, device)
    build = build_batched if cfg.engine == "batched" else build_reference
    return build(spec, clients, cfg, device), device


def _progress(desc: str, unit: str) -> Callable:
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, never a requirement
        return iter
    return lambda items: tqdm(items, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


def _save_checkpoint(path: Path, cfg: Config, engine, rounds: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"config": cfg.to_dict(), "engine": engine.state_dict(), "rounds": rounds}, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, cfg: Config, engine) -> list[dict]:
    state = torch.load(path, map_location=cfg.torch_device(), weights_only=False)
    saved = state["config"]
    changed = [k for k in Config.field_names()
               if k not in RESUME_MAY_CHANGE and saved.get(k, LEGACY_DEFAULTS.get(k)) != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"--resume: {path} was written with different settings ({', '.join(changed)}); "
                          "use the same flags or another --output-dir")
    engine.load_state_dict(state["engine"])
    return state["rounds"]


def _write_metrics(out: Path, cfg: Config, rounds: list[dict]) -> None:
    headline = {"metric": HEADLINE[cfg.method], "name": HEADLINE_NAMES[HEADLINE[cfg.method]]}
    (out / "metrics.json").write_text(json.dumps({"config": cfg.to_dict(), "headline": headline, "rounds": rounds},
                                                 indent=2))
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["round", "train_loss", "local_acc", "global_acc", "headline_acc", "seconds"])
        for r in rounds:
            writer.writerow([r["round"], f"{r['train_loss']:.6f}", f"{r['local_acc']:.4f}",
                             f"{r['global_acc']:.4f}", f"{r['headline_acc']:.4f}", f"{r['seconds']:.3f}"])


def run(cfg: Config, resume: bool = False, log: Callable[[str], None] = print) -> RunResult:
    """Train ``cfg.rounds`` rounds, logging one line per round; returns every round's figures."""
    cfg.validate()
    out = output_dir_for(cfg)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "checkpoint.pt"
    engine, device = prepare(cfg)
    rounds: list[dict] = []
    if resume and checkpoint.exists():
        rounds = _load_checkpoint(checkpoint, cfg, engine)
        log(f"resumed from {checkpoint} after round {len(rounds)}")
    elif checkpoint.exists():
        log(f"note: starting afresh over the run in {out} (pass --resume to continue it)")
    log(f"{cfg.method} on {cfg.dataset}: {cfg.clients} clients, frac {cfg.frac}, {cfg.rounds} rounds, "
        f"engine {cfg.engine}, ops path {ops.resolve_path(None, device)}, device {device}")

    for round_idx in range(len(rounds), cfg.rounds):
        start = time.perf_counter()
        sampled = sample_clients(cfg.clients, cfg.frac, cfg.seed, round_idx)
        results = engine.run_round(round_idx, sampled, _progress(f"round {round_idx + 1}", engine.progress_unit))
        seconds = time.perf_counter() - start
        n = len(results)
        accs = {"local_acc": sum(r.local_acc for r in results) / n,
                "global_acc": sum(r.global_acc for r in results) / n}
        record = {
            "round": round_idx + 1,
            "train_loss": sum(r.train_loss for r in results) / n,
            **accs,
            "headline_acc": accs[HEADLINE[cfg.method]],  # the figure the paper reports for this method
            "seconds": seconds,
            "clients": [vars(r) for r in results],
        }
        rounds.append(record)
        _save_checkpoint(checkpoint, cfg, engine, rounds)
        _write_metrics(out, cfg, rounds)
        log(f"round {record['round']:>4}/{cfg.rounds} | train loss {record['train_loss']:.4f} | "
            f"local acc {record['local_acc']:6.2f}% | global acc {record['global_acc']:6.2f}% | {seconds:6.1f} s")
    return RunResult(cfg, rounds, out)
