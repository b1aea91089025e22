"""What IG recovers, by setting: PSNR over seeds for the attack CLI's rows (``python -m hyperfl_fast.attack``).

    python benchmarks/ig_quality.py tv      # the TV-weight sweep that chose TV_WEIGHT (FedAvg, one step)
    python benchmarks/ig_quality.py rows    # the CLI's rows (FedAvg, DP baselines, HyperFL c) with today's IG
    python benchmarks/ig_quality.py hyperfl # HyperFL's variants a (unknown embedding + classifier) and b (white-box)

Fashion-MNIST (data/fashion-mnist or the Debian package), one image, 1000 iterations, one restart, seeds 0-2
(each seed picks the image and the attack's start), models at initialisation; prints a markdown table of the
median, min and max PSNR.  Attack quality, not speed: run it on an otherwise idle machine only for the timings.
"""
import statistics
import sys
import tempfile

from hyperfl_fast.attack import build_parser, run_attacks

SEEDS = (0, 1, 2)
TV_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def psnrs(args: list[str]) -> list[dict]:
    """Every row of one attack CLI run per seed: (method, variant, psnr, ssim, seconds)."""
    rows = []
    for seed in SEEDS:
        with tempfile.TemporaryDirectory() as out:
            parsed = build_parser().parse_args([*args, "--seed", str(seed), "--output-dir", out])
            rows += run_attacks(parsed, log=lambda _: None)["rows"]
    return rows


def line(name: str, rows: list[dict]) -> str:
    values = [r["psnr"] for r in rows]
    return (f"| {name} | {statistics.median(values):.1f} | {min(values):.1f}-{max(values):.1f} | "
            f"{', '.join(f'{v:.1f}' for v in values)} | {statistics.median(r['seconds'] for r in rows):.0f} |")


def main(what: str) -> None:
    common = ["--dataset", "fmnist", "--iterations", "1000", "--batch-size", "1"]
    print("| setting | median PSNR (dB) | min-max | seeds 0, 1, 2 | s per attack |\n|---|---|---|---|---|")
    if what == "tv":
        for tv in TV_GRID:
            print(line(f"fedavg, step, TV {tv:g}", psnrs([*common, "--method", "fedavg", "--tv", str(tv)])),
                  flush=True)
        return
    methods = ["--method", "hyperfl", "--variant", "a", "b"] if what == "hyperfl" else \
        ["--method", "fedavg", "dp-fedavg", "ppsgd", "centaur", "hyperfl", "--variant", "c"]
    rows = psnrs([*common, *methods])
    for key in dict.fromkeys((r["method"], r["variant"]) for r in rows):
        print(line(" ".join(filter(None, key)), [r for r in rows if (r["method"], r["variant"]) == key]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "rows")
