"""Command line: ``python -m hyperfl_fast.reproduce [flags]``: the paper's Table 1 by one command.

Trains every method on every dataset whose files are present (Fashion-MNIST
always; EMNIST, CIFAR-10 and CINIC-10 when they are in ``--data-dir``; missing
ones are listed and skipped, never downloaded), over several seeds, and writes
to ``--output-dir``:

- ``table.md``: mean ± std over seeds of each method's headline figure (the one
  the paper reports: mean local accuracy for personalised methods, global-model
  accuracy for FedAvg) beside the paper's figure, their difference and the
  seconds per run;
- ``accuracy_<dataset>.png``: headline accuracy against round, one line per
  method, with a band over seeds;
- ``results.json``: the settings, every run's curve and the table's rows;
- ``runs/<dataset>-<method>-seed<k>/``: each run's own metrics and checkpoint.

It is resumable: a finished run (its ``metrics.json`` holds at least the
requested rounds with the same settings) is read back, not redone, and an
unfinished one continues from its checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import check_writable, write_json
from .config import Config, ConfigError
from .data import DATASETS, DatasetError, dataset_present
from .interrupts import graceful_interrupts
from .methods import HEADLINE_NAMES, METHODS, get_method
from .runner import RESUME_MAY_CHANGE, TrainingDiverged, run

TABLE_DATASETS = ("fmnist", "emnist", "cifar10", "cinic10")
# Table 1 of the paper (20 clients, 200 rounds): each method declares its own figures (Method.paper)


@dataclass
class RunCurve:
    """One finished run: the headline accuracy after every round, and the time it took."""

    dataset: str
    method: str
    seed: int
    headline: list[float]  # per round, %
    seconds: float  # training time summed over rounds

    @property
    def final(self) -> float:
        return self.headline[-1]


def finished_rounds(out: Path, cfg: Config) -> list[dict] | None:
    """The first ``cfg.rounds`` rounds of a finished run in ``out`` with the same settings, else None."""
    try:
        saved = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    same = all(saved["config"].get(k) == v for k, v in cfg.to_dict().items() if k not in RESUME_MAY_CHANGE)
    if get_method(cfg.method).dp:  # their noise follows from the total rounds: only the same run will do
        same = same and saved["config"].get("rounds") == cfg.rounds
    if same and len(saved["rounds"]) >= cfg.rounds:
        return saved["rounds"][:cfg.rounds]  # every draw is keyed by round: a longer run's prefix is this run
    return None


def run_all(base: Config, methods: list[str], datasets: list[str], seeds: list[int], output_dir: Path,
            log=print) -> list[RunCurve]:
    """Train (or read back) every dataset x method x seed run; returns their curves."""
    jobs = [(d, m, s) for d in datasets for m in methods for s in seeds]
    curves = []
    for k, (dataset, method, seed) in enumerate(jobs, start=1):
        out = output_dir / "runs" / f"{dataset}-{method}-seed{seed}"
        cfg = dataclasses.replace(base, dataset=dataset, method=method, seed=seed, output_dir=str(out)).validate()
        rounds = finished_rounds(out, cfg)
        if rounds is not None:
            log(f"[{k}/{len(jobs)}] {dataset} {method} seed {seed}: finished earlier, read from {out}")
        else:
            log(f"[{k}/{len(jobs)}] {dataset} {method} seed {seed}: training {cfg.rounds} rounds")
            resume = (out / "checkpoint.pt").exists()
            rounds = run(cfg, resume=resume, log=lambda line: log(f"    {line}")).rounds
        curves.append(RunCurve(dataset, method, seed, [r["headline_acc"] for r in rounds],
                               sum(r["seconds"] for r in rounds)))
    return curves


def table_rows(curves: list[RunCurve]) -> list[dict]:
    """One row per (dataset, method): mean and std of the final headline figure over seeds, and the paper's."""
    rows = []
    for dataset, method in dict.fromkeys((c.dataset, c.method) for c in curves):
        group = [c for c in curves if (c.dataset, c.method) == (dataset, method)]
        finals = [c.final for c in group]
        mean = statistics.fmean(finals)
        paper = get_method(method).paper.get(dataset)
        rows.append({
            "dataset": dataset, "method": method, "figure": HEADLINE_NAMES[get_method(method).headline],
            "seeds": [c.seed for c in group], "mean": mean,
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "paper": paper, "difference": None if paper is None else mean - paper,
            "seconds_per_run": statistics.fmean(c.seconds for c in group),
        })
    return rows


def markdown_table(rows: list[dict], settings: str) -> str:
    """The table as Markdown, with the settings it was measured under."""
    lines = ["# HyperFL: the paper's Table 1, reproduced", "", settings, "",
             "| dataset | method | figure | ours (mean ± std) | seeds | paper | ours − paper | s/run |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "—" if r["paper"] is None else f"{r['paper']:.2f}"
        diff = "—" if r["difference"] is None else f"{r['difference']:+.2f}"
        lines.append(f"| {r['dataset']} | {r['method']} | {r['figure']} | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{len(r['seeds'])} | {paper} | {diff} | {r['seconds_per_run']:.1f} |")
    lines += ["", "Headline figure: mean local accuracy (each client's trained model on its own test split) for the "
              "personalised methods, global-model accuracy for FedAvg, as the paper reports them. "
              "`—`: no paper figure on record in this package."]
    return "\n".join(lines) + "\n"


def plot_curves(curves: list[RunCurve], output_dir: Path) -> list[Path]:
    """One PNG per dataset: headline accuracy against round, a line per method (mean) with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for dataset in dict.fromkeys(c.dataset for c in curves):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in dict.fromkeys(c.method for c in curves if c.dataset == dataset):
            group = [c.headline for c in curves if (c.dataset, c.method) == (dataset, method)]
            x = range(1, len(group[0]) + 1)
            per_round = list(zip(*group))
            line, = ax.plot(x, [statistics.fmean(v) for v in per_round],
                            label=f"{method} ({HEADLINE_NAMES[get_method(method).headline]})")
            ax.fill_between(x, [min(v) for v in per_round], [max(v) for v in per_round], color=line.get_color(),
                            alpha=0.2)
        ax.set(xlabel="round", ylabel="test accuracy (%)",
               title=f"{dataset}: mean over {len(group)} seed(s), band = min to max")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = output_dir / f"accuracy_{dataset}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def reproduce(base: Config, methods: list[str], datasets: list[str], seeds: list[int], output_dir: str | Path,
              log=print) -> dict:
    """Run the table (skipping datasets whose files are missing) and write table.md, the PNGs and results.json."""
    output_dir = Path(output_dir)
    present = [d for d in datasets if dataset_present(d, base.data_dir)]
    missing = [d for d in datasets if d not in present]
    if missing:
        log(f"skipped, files not in {base.data_dir} (never downloaded): {', '.join(missing)}")
    if not present:
        raise DatasetError(f"none of the datasets {', '.join(datasets)} is present; see README.md, 'Datasets'")
    check_writable(output_dir)
    curves = run_all(base, methods, present, seeds, output_dir, log)
    rows = table_rows(curves)
    settings = (f"Settings: {base.clients} clients, {base.rounds} rounds, {base.local_epochs} local epochs, "
                f"client init {base.client_init}, engine {base.engine}, device {base.torch_device()}, "
                f"seeds {', '.join(map(str, seeds))}.")
    table = markdown_table(rows, settings)
    (output_dir / "table.md").write_text(table)
    plots = plot_curves(curves, output_dir)
    results = {"settings": base.to_dict() | {"seeds": seeds, "methods": methods}, "missing_datasets": missing,
               "rows": rows, "runs": [dataclasses.asdict(c) for c in curves]}
    write_json(output_dir / "results.json", results)
    log(table)
    log(f"wrote {output_dir / 'table.md'}, {output_dir / 'results.json'} and {', '.join(str(p) for p in plots)}")
    return results


def _names(value: str, allowed, flag: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in allowed]
    if unknown or not names:
        raise ConfigError(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    d = Config(rounds=200)
    p = argparse.ArgumentParser(prog="python -m hyperfl_fast.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    p.add_argument("--datasets", default=",".join(TABLE_DATASETS),
                   help="comma-separated; missing ones are skipped (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds per run (default: %(default)s, the paper's)")
    p.add_argument("--clients", type=int, default=d.clients, help="clients (default: %(default)s, the paper's)")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="(default: %(default)s)")
    p.add_argument("--client-init", default=d.client_init, help="shared or independent (default: %(default)s)")
    p.add_argument("--engine", default=d.engine, help="batched or reference (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--data-dir", default=d.data_dir, help="where emnist/cifar10/cinic10 are (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/reproduce", help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        methods = _names(args.methods, list(METHODS), "--methods")
        datasets = _names(args.datasets, list(DATASETS), "--datasets")
        if args.seeds <= 0:
            raise ConfigError(f"--seeds must be positive, got {args.seeds}")
        base = Config(rounds=args.rounds, clients=args.clients, local_epochs=args.local_epochs,
                      client_init=args.client_init, engine=args.engine, device=args.device,
                      data_dir=args.data_dir).validate()
        with graceful_interrupts():  # Ctrl-C or SIGTERM: stop after saving; a second one: stop at once
            reproduce(base, methods, datasets, list(range(args.seeds)), args.output_dir)
    except (ConfigError, DatasetError, TrainingDiverged) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs are kept in {args.output_dir}/runs and the interrupted one resumes "
              "from its last round; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
