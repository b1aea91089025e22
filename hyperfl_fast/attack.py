"""Command line: ``python -m hyperfl_fast.attack`` — gradient inversion against FedAvg and HyperFL.

Attacks one client's upload (one local step: the gradient; or a local round:
the parameter change) for a batch of real images, with IG or DLG, and writes
``results.json``, ``table.md`` (PSNR / SSIM per method and variant, shaped
like the paper's Table 3) and ``grid.png`` (ground truth in the first row,
then one row per attack, like the paper's Figure 5) to the output directory.
Models are taken at initialisation, or from a ``hyperfl_fast.train`` checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from .config import Config
from .data import DATASETS, DatasetError, load_dataset
from .models import HyperNetwork, TargetCNN, cnn_spec, init_hyperfl
from .privacy.attacks import AttackBudget, LocalTraining, reconstruct
from .privacy.lpips import LPIPS
from .privacy.metrics import match_to_ground_truth, psnr, ssim
from .privacy.threats import fedavg_scenario, hyperfl_scenario

VARIANTS = ("a", "b", "c")
VARIANT_NAMES = {"a": "IG, unknown embedding + classifier", "b": "white-box (true embedding + classifier)",
                 "c": "structure-aware (rank-one heads)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyperfl_fast.attack", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", nargs="+", default=["fedavg", "hyperfl"], choices=["fedavg", "hyperfl"])
    p.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="HyperFL attack variants")
    p.add_argument("--setting", nargs="+", default=["step"], choices=["step", "round"],
                   help="step: the upload is one gradient; round: the change after --local-steps SGD steps")
    p.add_argument("--local-steps", type=int, default=5, help="local SGD steps in the 'round' setting")
    p.add_argument("--dataset", default="fmnist", choices=list(DATASETS))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--batch-size", type=int, default=1, help="images in the attacked batch (1 to 8)")
    p.add_argument("--attack", default="ig", choices=["ig", "dlg"])
    p.add_argument("--iterations", type=int, default=1000, help="optimisation steps per restart")
    p.add_argument("--restarts", type=int, default=1)
    p.add_argument("--tv", type=float, default=1e-3, help="total-variation weight (IG)")
    p.add_argument("--checkpoint", default=None, help="attack the models in a hyperfl_fast.train checkpoint.pt")
    p.add_argument("--client", type=int, default=0, help="which client's private parts a checkpoint provides")
    p.add_argument("--lpips-alexnet", default=None, help="local torchvision AlexNet weights (state dict) for LPIPS")
    p.add_argument("--lpips-linear", default=None, help="local LPIPS linear-layer weights for AlexNet (alex.pth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="runs/attack")
    return p


def load_models(args, spec, device):
    """(fedavg TargetCNN, (hypernet, embedding, classifier)): from a checkpoint or freshly initialised."""
    cfg = Config(dataset=args.dataset, clients=max(args.client + 1, 1), seed=args.seed)
    torch.manual_seed(args.seed)
    fedavg_model = TargetCNN(spec)
    hypernet, embeddings, classifiers = init_hyperfl(spec, cfg.clients, cfg.embed_dim, cfg.hidden_dim, device)
    embedding, classifier = embeddings[args.client].detach(), classifiers[args.client]
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        saved_method, engine = state["config"]["method"], state["engine"]
        wrong = [m for m in args.method if m != saved_method]
        if wrong:
            raise ValueError(f"--checkpoint {args.checkpoint} holds a {saved_method} run; it cannot serve "
                             f"--method {' '.join(wrong)}")
        if saved_method == "fedavg":
            model_state = engine.get("model") or {k: t[0] for k, t in engine["params"].items()}
            fedavg_model.load_state_dict(model_state)
        else:
            hypernet = HyperNetwork(*engine["hypernet"]["fc.weight"].shape[::-1],
                                    engine["hypernet"]["heads.weight"].shape[0])
            hypernet.load_state_dict(engine["hypernet"])
            embedding = engine["client_embeddings"][args.client]
            classifier = nn.Linear(spec.hidden, spec.num_classes)
            if "classifiers" in engine:
                classifier.load_state_dict(engine["classifiers"][args.client])
            else:
                classifier.load_state_dict({"weight": engine["classifier_weight"][args.client],
                                            "bias": engine["classifier_bias"][args.client]})
    return fedavg_model, (hypernet, embedding, classifier)


def run_attacks(args, log=print) -> dict:
    """Run every requested attack; returns the results and writes them to ``args.output_dir``."""
    if not 1 <= args.batch_size <= 8:
        raise ValueError(f"--batch-size must be between 1 and 8, got {args.batch_size}")
    for name in ("iterations", "restarts", "local_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if (args.lpips_alexnet is None) != (args.lpips_linear is None):
        raise ValueError("LPIPS needs both --lpips-alexnet and --lpips-linear (or neither)")
    lpips = LPIPS(args.lpips_alexnet, args.lpips_linear) if args.lpips_alexnet else None
    dataset = load_dataset(args.dataset, args.data_dir)
    spec = cnn_spec(dataset.in_channels, dataset.num_classes)
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(dataset.train_labels), generator=gen)[:args.batch_size]
    x, y = dataset.normalize(dataset.train_images[pick]), dataset.train_labels[pick]
    mean, std = torch.tensor(dataset.mean).view(-1, 1, 1), torch.tensor(dataset.std).view(-1, 1, 1)
    bounds = ((0 - mean) / std, (1 - mean) / std)
    truth = (x * std + mean).clamp(0, 1)
    fedavg_model, (hypernet, embedding, classifier) = load_models(args, spec, torch.device("cpu"))
    budget = AttackBudget(args.iterations, args.restarts, tv_weight=args.tv, seed=args.seed)

    rows, images = [], [truth]
    for setting in args.setting:
        steps = 1 if setting == "step" else args.local_steps
        scenarios = []
        if "fedavg" in args.method:
            scenarios.append(fedavg_scenario(fedavg_model, x, y, LocalTraining(steps)))
        if "hyperfl" in args.method:
            for variant in args.variant:
                scenarios.append(hyperfl_scenario(spec, hypernet, embedding, classifier, x, y,
                                                  LocalTraining(steps, clip=50.0), variant))
        for scenario in scenarios:
            log(f"attacking {scenario.name} ({setting}, {args.attack}, {args.iterations} iterations)")
            rec = reconstruct(scenario.simulate, scenario.observed, tuple(x.shape), spec.num_classes, bounds,
                              scenario.labels, scenario.unknowns, args.attack, budget,
                              progress=_progress(scenario.name))
            recon = match_to_ground_truth((rec.images * std + mean).clamp(0, 1), truth)
            p, s = psnr(recon, truth), ssim(recon, truth)
            variant = scenario.name.split("-")[1] if "-" in scenario.name else ""
            rows.append({"method": scenario.name.split("-")[0], "variant": variant,
                         "variant_name": VARIANT_NAMES.get(variant, "IG" if args.attack == "ig" else "DLG"),
                         "setting": setting, "psnr": p.mean().item(), "ssim": s.mean().item(),
                         "lpips": lpips(recon, truth).mean().item() if lpips else None,
                         "psnr_per_image": p.tolist(), "ssim_per_image": s.tolist(),
                         "matching_loss": rec.matching_loss, "seconds": rec.seconds, **scenario.diagnostics})
            images.append(recon)
            log(f"  PSNR {p.mean().item():.2f} dB | SSIM {s.mean().item():.3f} | {rec.seconds:.0f} s")
    results = {"config": vars(args), "ground_truth_labels": y.tolist(), "rows": rows}
    write_outputs(Path(args.output_dir), results, images, args.batch_size)
    return results


def _progress(desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return iter
    return lambda items: tqdm(items, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def markdown_table(rows: list[dict]) -> str:
    """Rows method/variant/setting; columns PSNR, SSIM, LPIPS (as the paper's Table 3)."""
    lines = ["| method | variant | setting | PSNR (dB) | SSIM | LPIPS |", "|---|---|---|---|---|---|"]
    for r in rows:
        lpips = f"{r['lpips']:.3f}" if r["lpips"] is not None else \
            "not computed (needs local pretrained weights: --lpips-alexnet, --lpips-linear)"
        lines.append(f"| {r['method']} | {r['variant_name']} | {r['setting']} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
                     f"{lpips} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: dict, images: list[torch.Tensor], batch_size: int) -> None:
    """results.json, table.md and grid.png (row 0: ground truth; then one row per attack)."""
    from torchvision.utils import save_image

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "table.md").write_text(markdown_table(results["rows"]))
    save_image(torch.cat(images), out / "grid.png", nrow=batch_size, padding=2)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = run_attacks(args)
    except (ValueError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_table(results["rows"]), end="")
    print(f"results in {args.output_dir}/results.json, table.md, grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
