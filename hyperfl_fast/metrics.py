"""A run's figures: one record per round and the metrics files (``metrics.json``, ``metrics.csv``), written the
same way by the training CLI and by the Flower server."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import write_csv, write_json
from .config import Config
from .federation import ClientResult
from .methods import HEADLINE_NAMES, get_method


def write_metrics(out: Path, cfg: Config, rounds: list[dict], ops_stats: dict | None = None) -> None:
    """metrics.json (settings, headline, every round, and the ops' paths, calls and measured times) and
    metrics.csv (one row per round) in ``out``."""
    metric = get_method(cfg.method).headline
    headline = {"metric": metric, "name": HEADLINE_NAMES[metric]}
    write_json(out / "metrics.json", {"config": cfg.to_dict(), "headline": headline, "rounds": rounds,
                                      **({"ops": ops_stats} if ops_stats else {})})
    columns = ["round", "train_loss", "local_acc", "global_acc", "headline_acc", "seconds"]
    write_csv(out / "metrics.csv", columns, [[r[c] for c in columns] for r in rounds])


def round_record(cfg: Config, round_idx: int, results: list[ClientResult], seconds: float) -> dict:
    """One round's entry of metrics.json: means over the round's clients, the headline figure, each client."""
    n = len(results)
    accs = {"local_acc": sum(r.local_acc for r in results) / n, "global_acc": sum(r.global_acc for r in results) / n}
    epsilons = [r.epsilon for r in results if r.epsilon is not None]
    return {
        "round": round_idx + 1,
        "train_loss": sum(r.train_loss for r in results) / n,
        **accs,
        "headline_acc": accs[get_method(cfg.method).headline],  # the figure the paper reports for this method
        "seconds": seconds,
        **({"epsilon": max(epsilons)} if epsilons else {}),  # DP methods: the most any client has spent
        "clients": [vars(r) for r in results],
    }
