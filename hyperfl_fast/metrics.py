"""A run's figures: one record per round and the metrics files (``metrics.json``, ``metrics.csv``), written the
same way by the training CLI and by the Flower server."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import write_csv, write_json
from .config import Config
from .federation import ClientResult
from .methods import HEADLINE_NAMES, get_method


def privacy_claims(cfg: Config) -> dict | None:
    """What a DP run's epsilon means (None for a method without DP): for metrics.json and the log."""
    method = get_method(cfg.method)
    if not method.dp:
        return None
    return {"target_epsilon": cfg.epsilon, "delta": cfg.delta, "noise": cfg.dp_noise,
            "private": cfg.dp_noise == "secure",  # keyed noise can be recomputed from the seed and removed
            "epsilon_is": "the accountant's bound (Poisson-sampled batches)" if cfg.poisson else
            "nominal (shuffled batches; the accountant's bound assumes Poisson sampling)",
            "covers": method.dp_guarantee}


def epsilon_note(cfg: Config) -> str:
    """The short note the log puts after a DP run's epsilon."""
    return ("holds" if cfg.poisson else "nominal") + ("" if cfg.dp_noise == "secure" else
                                                      "; keyed noise: NOT private")


RANDOM_BACKBONE = "randomly initialised backbone (no --backbone-weights): not the paper's pre-trained setting"


def backbone_claims(cfg: Config) -> dict | None:
    """What a backbone run's backbone is (None without one): for metrics.json; a random one is said loudly."""
    if cfg.backbone is None:
        return None
    return {"name": cfg.backbone, "weights": cfg.backbone_weights, "pretrained": cfg.backbone_weights is not None,
            **({} if cfg.backbone_weights else {"note": RANDOM_BACKBONE})}


def write_metrics(out: Path, cfg: Config, rounds: list[dict], ops_stats: dict | None = None) -> None:
    """metrics.json (settings, headline, what a DP run's epsilon means, every round, and the ops' paths, calls
    and measured times) and metrics.csv (one row per round) in ``out``."""
    metric = get_method(cfg.method).headline
    headline = {"metric": metric, "name": HEADLINE_NAMES[metric]}
    privacy, backbone = privacy_claims(cfg), backbone_claims(cfg)
    write_json(out / "metrics.json", {"config": cfg.to_dict(), "headline": headline,
                                      **({"privacy": privacy} if privacy else {}),
                                      **({"backbone": backbone} if backbone else {}), "rounds": rounds,
                                      **({"ops": ops_stats} if ops_stats else {})})
    columns = ["round", "train_loss", "local_acc", "global_acc", "headline_acc", "seconds"]
    write_csv(out / "metrics.csv", columns, [[r[c] for c in columns] for r in rounds])


def _mean(values: list) -> float | None:
    """The mean of the figures that were reported (None if none were: e.g. a Flower DP client sends none)."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def round_record(cfg: Config, round_idx: int, results: list[ClientResult], seconds: float,
                 epsilons: list[float] | None = None) -> dict:
    """One round's entry of metrics.json: means over the round's clients, the headline figure, each client;
    for DP methods every client's epsilon spent so far (``epsilons``, all clients, not only this round's) and
    the largest of them."""
    accs = {"local_acc": _mean([r.local_acc for r in results]), "global_acc": _mean([r.global_acc for r in results])}
    return {
        "round": round_idx + 1,
        "train_loss": _mean([r.train_loss for r in results]),
        **accs,
        "headline_acc": accs[get_method(cfg.method).headline],  # the figure the paper reports for this method
        "seconds": seconds,
        **({"epsilon": max(epsilons), "epsilons": epsilons} if epsilons else {}),  # the most any client has spent
        "clients": [vars(r) for r in results],
    }


def round_line(cfg: Config, record: dict) -> str:
    """The log's line for a round (a figure no client reported shows as '-')."""
    def figure(key, spec):
        return "-" if record[key] is None else format(record[key], spec)
    line = (f"round {record['round']:>4}/{cfg.rounds} | train loss {figure('train_loss', '.4f')} | "
            f"local acc {figure('local_acc', '6.2f')}% | global acc {figure('global_acc', '6.2f')}% | ")
    if "epsilon" in record:
        line += f"epsilon {record['epsilon']:.3f} (max over {len(record['epsilons'])} clients, {epsilon_note(cfg)}) | "
    line += f"{record['seconds']:6.1f} s"
    return line + (" | RANDOM backbone (no --backbone-weights)" if cfg.backbone and not cfg.backbone_weights else "")
