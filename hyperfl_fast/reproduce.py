"""Command line: ``python -m hyperfl_fast.reproduce [flags]``: the paper's Table 1 by one command (``--table 2``:
its Table 2, :mod:`hyperfl_fast.reproduce_lpm`).

Trains every method on every dataset whose files are present (Fashion-MNIST
always; EMNIST, CIFAR-10 and CINIC-10 when they are in ``--data-dir``; missing
ones are listed and skipped, never downloaded), over several seeds, in the
paper's client settings (``--clients 20``: 20 clients, all training every
round; ``--clients 100``: 100 clients, 30 sampled a round; ``--clients
20,100``: both), and writes to ``--output-dir``:

- ``table.md``: mean ± std over seeds of each method's headline figure (the one
  the paper reports: mean local accuracy for personalised methods, global-model
  accuracy for FedAvg and pFedHN) beside the paper's figure, their difference and the
  seconds per run and per round; then the paper's whole Table 1 (every method
  x dataset x client setting, ours beside each figure where it was run) and
  its Table 4 (seconds per round) beside ours;
- ``accuracy_<dataset>[_100clients].png``: headline accuracy against round, one
  line per method with a band over seeds and the paper's figure dashed;
- ``results.json``: the settings, every run's curve and the table's rows;
- ``runs/<dataset>[-100clients]-<method>-seed<k>/``: each run's own metrics and
  checkpoint.

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

from .backbones import BACKBONES, BackboneWeightsError, load_backbone_weights
from .checkpoint import check_writable, write_json
from .config import Config, ConfigError
from .data import DATASETS, DatasetError, dataset_present
from .interrupts import graceful_interrupts
from .methods import HEADLINE_NAMES, METHODS, get_method
from .runner import RESUME_MAY_CHANGE, TrainingDiverged, run

TABLE_DATASETS = ("emnist", "fmnist", "cifar10", "cinic10")  # Table 1's columns, in its order
# Table 1 of the paper (200 rounds): each method declares its own figures (Method.paper) per client setting
CLIENT_SETTINGS = {20: 1.0, 100: 0.3}  # the paper's settings: clients -> fraction sampled each round
DATASET_TITLES = {"fmnist": "Fashion-MNIST", "emnist": "EMNIST", "cifar10": "CIFAR-10", "cinic10": "CINIC-10"}


@dataclass
class RunCurve:
    """One finished run: the headline accuracy after every round, and the time it took."""

    dataset: str
    method: str
    seed: int
    headline: list[float]  # per round, %
    seconds: float  # training time summed over rounds
    clients: int = 20  # the client setting (CLIENT_SETTINGS) ...
    frac: float = 1.0  # ... and the fraction of them sampled each round

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


def rounds_of(cfg: Config, out: Path, what: str, log=print) -> list[dict]:
    """The rounds of run ``cfg`` in ``out``: read back when it finished earlier, else trained (resumed from its
    checkpoint when there is one)."""
    rounds = finished_rounds(out, cfg)
    if rounds is not None:
        log(f"{what}: finished earlier, read from {out}")
        return rounds
    log(f"{what}: training {cfg.rounds} rounds")
    return run(cfg, resume=(out / "checkpoint.pt").exists(), log=lambda line: log(f"    {line}")).rounds


def setting_name(dataset: str, clients: int) -> str:
    """How runs and plots of a dataset in a client setting are named (20 clients: the dataset alone)."""
    return dataset if clients == 20 else f"{dataset}-{clients}clients"


def run_all(base: Config, methods: list[str], datasets: list[str], seeds: list[int], output_dir: Path,
            log=print, settings: dict[int, float] | None = None) -> list[RunCurve]:
    """Train (or read back) every dataset x client setting x method x seed run; returns their curves.
    ``settings``: clients -> fraction sampled each round (default: ``base``'s own)."""
    settings = settings or {base.clients: base.frac}
    jobs = [(d, c, m, s) for d in datasets for c in settings for m in methods for s in seeds]
    curves = []
    for k, (dataset, clients, method, seed) in enumerate(jobs, start=1):
        out = output_dir / "runs" / f"{setting_name(dataset, clients)}-{method}-seed{seed}"
        cfg = dataclasses.replace(base, dataset=dataset, method=method, seed=seed, clients=clients,
                                  frac=settings[clients], output_dir=str(out)).validate()
        rounds = rounds_of(cfg, out, f"[{k}/{len(jobs)}] {dataset} {clients} clients {method} seed {seed}", log)
        curves.append(RunCurve(dataset, method, seed, [r["headline_acc"] for r in rounds],
                               sum(r["seconds"] for r in rounds), clients, settings[clients]))
    return curves


def table_rows(curves: list[RunCurve]) -> list[dict]:
    """One row per (dataset, clients, method): mean and std of the final headline figure over seeds, the
    paper's figure, and the seconds per run and per round."""
    rows = []
    for dataset, clients, method in dict.fromkeys((c.dataset, c.clients, c.method) for c in curves):
        group = [c for c in curves if (c.dataset, c.clients, c.method) == (dataset, clients, method)]
        finals = [c.final for c in group]
        mean = statistics.fmean(finals)
        paper = get_method(method).paper.get(dataset, {}).get(clients)
        rows.append({
            "dataset": dataset, "clients": clients, "method": method,
            "figure": HEADLINE_NAMES[get_method(method).headline], "seeds": [c.seed for c in group], "mean": mean,
            "std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "paper": paper, "difference": None if paper is None else mean - paper,
            "seconds_per_run": statistics.fmean(c.seconds for c in group),
            "seconds_per_round": statistics.fmean(c.seconds / len(c.headline) for c in group),
        })
    return rows


def markdown_table(rows: list[dict], settings: str) -> str:
    """The tables as Markdown, with the settings they were measured under: our runs beside the paper's figures,
    then the paper's whole Table 1 and Table 4 with ours where we ran them."""
    lines = ["# HyperFL: the paper's Table 1, reproduced", "", settings, "",
             "| dataset | clients | method | figure | ours (mean ± std) | seeds | paper | ours − paper | s/run | "
             "s/round |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = "—" if r["paper"] is None else f"{r['paper']:.2f}"
        diff = "—" if r["difference"] is None else f"{r['difference']:+.2f}"
        lines.append(f"| {r['dataset']} | {r['clients']} | {r['method']} | {r['figure']} | "
                     f"{r['mean']:.2f} ± {r['std']:.2f} | {len(r['seeds'])} | {paper} | {diff} | "
                     f"{r['seconds_per_run']:.1f} | {r['seconds_per_round']:.2f} |")
    lines += ["", "Headline figure: mean local accuracy (each client's trained model on its own test split) for the "
              "personalised methods, global-model accuracy for FedAvg and pFedHN, as the paper reports them. "
              "`—`: no paper figure on record in this package.", ""]
    return "\n".join(lines + paper_tables(rows)) + "\n"


def paper_tables(rows: list[dict]) -> list[str]:
    """The paper's Table 1 (every method x dataset x client setting) and Table 4 as Markdown lines, each cell
    ours / paper (ours − paper) where we ran it, the paper's figure alone where we did not."""
    ours = {(r["dataset"], r["clients"], r["method"]): r for r in rows}
    columns = [(d, c) for d in TABLE_DATASETS for c in CLIENT_SETTINGS]
    methods = [name for name, m in METHODS.items() if m.paper or any(k[2] == name for k in ours)]
    lines = ["## Table 1: ours / paper (ours − paper)", "",
             "| method | " + " | ".join(f"{DATASET_TITLES[d]} {c}" for d, c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for name in methods:
        cells = []
        for dataset, clients in columns:
            paper, row = METHODS[name].paper.get(dataset, {}).get(clients), ours.get((dataset, clients, name))
            figure = "—" if paper is None else f"{paper:.2f}"
            cells.append(figure if row is None else f"{row['mean']:.2f} / {figure}" +
                         ("" if paper is None else f" ({row['mean'] - paper:+.2f})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "20: 20 clients, all training every round; 100: 100 clients, 30 sampled each round. A cell "
              "without \"/\" was not run here.", "",
              "## Table 4: seconds per round (paper: EMNIST, 20 clients, the authors' GPU)", "",
              "| method | paper | ours (dataset, clients) |", "|---|---|---|"]
    for name in methods:
        seconds = METHODS[name].paper_seconds_per_round
        mine = "; ".join(f"{r['seconds_per_round']:.2f} ({r['dataset']}, {r['clients']})"
                         for k, r in ours.items() if k[2] == name) or "—"
        lines.append(f"| {name} | {'—' if seconds is None else seconds} | {mine} |")
    return lines


def plot_curves(curves: list[RunCurve], output_dir: Path) -> list[Path]:
    """One PNG per dataset and client setting: headline accuracy against round, a line per method (mean) with a
    min-max band over seeds and the paper's figure as a dashed line in the method's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    paths = []
    for dataset, clients, frac in dict.fromkeys((c.dataset, c.clients, c.frac) for c in curves):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        runs = [c for c in curves if (c.dataset, c.clients) == (dataset, clients)]
        for method in dict.fromkeys(c.method for c in runs):
            group = [c.headline for c in runs if c.method == method]
            x = range(1, len(group[0]) + 1)
            per_round = list(zip(*group))
            line, = ax.plot(x, [statistics.fmean(v) for v in per_round],
                            label=f"{method} ({HEADLINE_NAMES[get_method(method).headline]})")
            ax.fill_between(x, [min(v) for v in per_round], [max(v) for v in per_round], color=line.get_color(),
                            alpha=0.2)
            paper = get_method(method).paper.get(dataset, {}).get(clients)
            if paper is not None:
                ax.axhline(paper, color=line.get_color(), linestyle="--", linewidth=1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        setting = "all training" if frac == 1 else f"{frac:g} sampled"
        ax.set(xlabel="round", ylabel="test accuracy (%)",
               title=f"{DATASET_TITLES.get(dataset, dataset)}, {clients} clients ({setting}): mean over "
                     f"{len(group)} seed(s), band = min to max, dashed = paper")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = output_dir / f"accuracy_{setting_name(dataset, clients).replace('-', '_')}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def present_datasets(datasets: list[str], data_dir: str, log=print) -> tuple[list[str], list[str]]:
    """(present, missing) of ``datasets`` in ``data_dir``, the missing ones logged; a DatasetError if none is."""
    present = [d for d in datasets if dataset_present(d, data_dir)]
    missing = [d for d in datasets if d not in present]
    if missing:
        log(f"skipped, files not in {data_dir} (never downloaded): {', '.join(missing)}")
    if not present:
        raise DatasetError(f"none of the datasets {', '.join(datasets)} is present; see README.md, 'Datasets'")
    return present, missing


def reproduce(base: Config, methods: list[str], datasets: list[str], seeds: list[int], output_dir: str | Path,
              log=print, settings: dict[int, float] | None = None) -> dict:
    """Run the table (skipping datasets whose files are missing) and write table.md, the PNGs and results.json.
    ``settings``: clients -> fraction sampled each round (default: ``base``'s own; the CLI passes the paper's)."""
    settings = settings or {base.clients: base.frac}
    output_dir = Path(output_dir)
    present, missing = present_datasets(datasets, base.data_dir, log)
    check_writable(output_dir)
    curves = run_all(base, methods, present, seeds, output_dir, log, settings)
    rows = table_rows(curves)
    described = ", ".join(f"{c} clients ({'all' if f == 1 else f'{f:g}'} a round)" for c, f in settings.items())
    table = markdown_table(rows, f"Settings: {described}, {base.rounds} rounds, {base.local_epochs} local epochs, "
                                 f"client init {base.client_init}, engine {base.engine}, device "
                                 f"{base.torch_device()}, seeds {', '.join(map(str, seeds))}.")
    (output_dir / "table.md").write_text(table)
    plots = plot_curves(curves, output_dir)
    results = {"settings": base.to_dict() | {"seeds": seeds, "methods": methods, "client_settings": settings},
               "missing_datasets": missing, "rows": rows, "runs": [dataclasses.asdict(c) for c in curves]}
    write_json(output_dir / "results.json", results)
    log(table)
    log(f"wrote {output_dir / 'table.md'}, {output_dir / 'results.json'} and {', '.join(str(p) for p in plots)}")
    return results


def _weight_files(value: str, backbones: list[str]) -> dict[str, str]:
    """``--backbone-weights name=FILE,...`` as {backbone: file}; a one-line ConfigError for a bad entry."""
    weights = {}
    for entry in filter(None, (v.strip() for v in value.split(","))):
        name, _, path = entry.partition("=")
        if not path or name not in backbones:
            raise ConfigError(f"--backbone-weights: {entry!r} is not BACKBONE=FILE with BACKBONE one of "
                              f"{', '.join(backbones)}")
        try:  # checked now, not when its first run starts
            load_backbone_weights(BACKBONES[name].build(), path, name)
        except (BackboneWeightsError, ImportError) as exc:
            raise ConfigError(str(exc)) from None
        weights[name] = path
    return weights


def _names(value: str, allowed, flag: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in names if v not in allowed]
    if unknown or not names:
        raise ConfigError(f"{flag}: unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(allowed)}")
    return names


def table1_methods() -> list[str]:
    """The methods of the paper's Table 1 (the small CNNs), in its order; HyperFL-LPM is Table 2's."""
    return [name for name, m in METHODS.items() if not m.needs_backbone]


def build_parser() -> argparse.ArgumentParser:
    d = Config(rounds=200)
    p = argparse.ArgumentParser(prog="python -m hyperfl_fast.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(table1_methods()),
                   help="comma-separated, of Table 1's (default: %(default)s)")
    p.add_argument("--table", type=int, default=1, choices=(1, 2),
                   help="1: Table 1 (the small CNNs); 2: Table 2 (HyperFL-LPM and its baselines on backbones, 20 "
                        "clients; --methods and --clients are Table 1's) (default: %(default)s)")
    p.add_argument("--datasets", default=None,
                   help=f"comma-separated; missing ones are skipped (default: {','.join(TABLE_DATASETS)}; "
                        "Table 2: emnist,cifar10)")
    p.add_argument("--backbones", default="resnet18,vit-s16",
                   help="Table 2: comma-separated (default: %(default)s, the paper's)")
    p.add_argument("--backbone-weights", default="",
                   help="Table 2: local weight files, e.g. resnet18=r18.pt,vit-s16=vits.pt (README: how to make "
                        "them); a backbone without one is random")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per run (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds per run (default: %(default)s, the paper's)")
    p.add_argument("--clients", default="20",
                   help="the paper's client settings to run: 20 (all train every round), 100 (30 sampled a "
                        "round) or 20,100 (default: %(default)s)")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help="(default: %(default)s)")
    p.add_argument("--client-init", default=d.client_init, help="shared or independent (default: %(default)s)")
    p.add_argument("--engine", default=d.engine, help="batched or reference (default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--data-dir", default=d.data_dir, help="where emnist/cifar10/cinic10 are (default: %(default)s)")
    p.add_argument("--output-dir", default="runs/reproduce", help="(default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> int:
    from .reproduce_lpm import TABLE_2_DATASETS, reproduce_table2  # (it reads this module's helpers)

    args = build_parser().parse_args(argv)
    try:
        methods = _names(args.methods, table1_methods(), "--methods")
        datasets = _names(args.datasets or ",".join(TABLE_DATASETS if args.table == 1 else TABLE_2_DATASETS),
                          list(DATASETS), "--datasets")
        backbones = _names(args.backbones, list(BACKBONES), "--backbones")
        weights = _weight_files(args.backbone_weights, backbones)
        if args.seeds <= 0:
            raise ConfigError(f"--seeds must be positive, got {args.seeds}")
        settings = {int(c): CLIENT_SETTINGS[int(c)]
                    for c in _names(args.clients, [str(c) for c in CLIENT_SETTINGS], "--clients")}
        base = Config(rounds=args.rounds, local_epochs=args.local_epochs, client_init=args.client_init,
                      engine=args.engine, device=args.device, data_dir=args.data_dir).validate()
        with graceful_interrupts():  # Ctrl-C or SIGTERM: stop after saving; a second one: stop at once
            if args.table == 2:
                reproduce_table2(base, backbones, datasets, list(range(args.seeds)), args.output_dir, weights)
            else:
                reproduce(base, methods, datasets, list(range(args.seeds)), args.output_dir, settings=settings)
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
