"""The paper's Table 2 (HyperFL-LPM and its baselines on pre-trained backbones): ``python -m
hyperfl_fast.reproduce --table 2``.

Every column of Table 2 (:data:`~hyperfl_fast.methods.hyperfl_lpm.TABLE_2_COLUMNS`: Local and FedAvg with a fixed
backbone or with fine-tuned adapters, and HyperFL-LPM) on every backbone of ``--backbones`` and every dataset
present, over the seeds, with 20 clients; writes ``table2.md`` (ours beside every paper figure) and
``results_table2.json`` to the output folder, and each run's folder under ``runs/``.  Runs are read back or
resumed as in :mod:`hyperfl_fast.reproduce`.  The backbones' weights come from ``--backbone-weights``
(``resnet18=FILE,vit-s16=FILE``); without them the runs use random backbones and the table says so.
"""
from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

from .backbones import BACKBONES
from .checkpoint import check_writable, write_json
from .config import Config
from .methods import HEADLINE_NAMES, get_method
from .methods.hyperfl_lpm import TABLE_2, TABLE_2_COLUMNS
from .reproduce import DATASET_TITLES, present_datasets, rounds_of

TABLE_2_DATASETS = ("emnist", "cifar10")


def table2_runs(base: Config, backbones: list[str], datasets: list[str], seeds: list[int], output_dir: Path,
                weights: dict[str, str], log=print) -> list[dict]:
    """Train (or read back) every dataset x backbone x column x seed run; each run's final headline figure."""
    jobs = [(d, b, c, s) for d in datasets for b in backbones for c in TABLE_2_COLUMNS for s in seeds]
    finals = []
    for k, (dataset, backbone, column, seed) in enumerate(jobs, start=1):
        method, adapters = TABLE_2_COLUMNS[column]
        out = output_dir / "runs" / f"table2-{dataset}-{backbone}-{method}{'-adapters' if adapters == 'on' else ''}" \
                                    f"-seed{seed}"
        arch = BACKBONES[backbone]  # the authors' lr and batch size for it
        cfg = dataclasses.replace(base, dataset=dataset, method=method, backbone=backbone, adapters=adapters,
                                  backbone_weights=weights.get(backbone), lr=arch.lr, batch_size=arch.batch_size,
                                  seed=seed, output_dir=str(out)).validate()
        rounds = rounds_of(cfg, out, f"[{k}/{len(jobs)}] {dataset} {backbone} {column} seed {seed}", log)
        finals.append({"dataset": dataset, "backbone": backbone, "column": column, "seed": seed,
                       "final": rounds[-1]["headline_acc"],
                       "seconds_per_round": statistics.fmean(r["seconds"] for r in rounds)})
    return finals


def table2_markdown(finals: list[dict], settings: str) -> str:
    """Table 2 as Markdown: every paper figure, ours (mean over seeds) and the difference beside it where run."""
    ours = {}
    for row in finals:
        ours.setdefault((row["dataset"], row["backbone"], row["column"]), []).append(row["final"])
    lines = ["# HyperFL-LPM: the paper's Table 2, reproduced", "", settings, "",
             "| dataset | backbone | " + " | ".join(TABLE_2_COLUMNS) + " |",
             "|---|---|" + "---|" * len(TABLE_2_COLUMNS)]
    others = [k for k in dict.fromkeys((r["dataset"], r["backbone"]) for r in finals) if k not in TABLE_2]
    for dataset, backbone in [*TABLE_2, *others]:  # the paper's rows, then rows it does not have
        cells = []
        for column, paper in zip(TABLE_2_COLUMNS, TABLE_2.get((dataset, backbone), (None,) * len(TABLE_2_COLUMNS))):
            mine = ours.get((dataset, backbone, column))
            figure = "—" if paper is None else f"{paper:.2f}"
            cells.append(figure if mine is None else f"{statistics.fmean(mine):.2f} / {figure}"
                         + ("" if paper is None else f" ({statistics.fmean(mine) - paper:+.2f})"))
        lines.append(f"| {DATASET_TITLES.get(dataset, dataset)} | {backbone} | " + " | ".join(cells) + " |")
    headlines = ", ".join(f"{column}: {HEADLINE_NAMES[get_method(method).headline]}"
                          for column, (method, _) in TABLE_2_COLUMNS.items())
    lines += ["", "Cells: ours (mean over seeds) / paper (ours − paper); the paper's figure alone where not run. "
              f"† a fixed backbone, †† adapters fine-tuned. Figures: {headlines}.", ""]
    return "\n".join(lines)


def reproduce_table2(base: Config, backbones: list[str], datasets: list[str], seeds: list[int],
                     output_dir: str | Path, weights: dict[str, str], log=print) -> dict:
    """Run Table 2 (skipping datasets whose files are missing) and write table2.md and results_table2.json."""
    output_dir = Path(output_dir)
    present, missing = present_datasets(datasets, base.data_dir, log)
    random = [b for b in backbones if b not in weights]
    if random:
        log(f"warning: no --backbone-weights for {', '.join(random)}: those runs use a RANDOM backbone, not the "
            "paper's pre-trained one, and are not comparable with its figures")
    check_writable(output_dir)
    finals = table2_runs(base, backbones, present, seeds, output_dir, weights, log)
    described = (f"Settings: 20 clients, {base.rounds} rounds, {base.local_epochs} local epochs, the authors' lr and "
                 f"batch 16 per backbone, engine {base.engine}, device {base.torch_device()}, seeds "
                 f"{', '.join(map(str, seeds))}; backbone weights: "
                 + ", ".join(f"{b} {weights.get(b, 'RANDOM (none given)')}" for b in backbones) + ".")
    table = table2_markdown(finals, described)
    (output_dir / "table2.md").write_text(table)
    results = {"settings": base.to_dict() | {"seeds": seeds, "backbones": backbones, "weights": weights},
               "missing_datasets": missing, "runs": finals}
    write_json(output_dir / "results_table2.json", results)
    log(table)
    log(f"wrote {output_dir / 'table2.md'} and {output_dir / 'results_table2.json'}")
    return results
