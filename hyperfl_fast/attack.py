"""Command line: ``python -m hyperfl_fast.attack`` — gradient inversion against FedAvg, HyperFL and the DP baselines.

Attacks one client's upload (one local step: the gradient; or a local round:
the parameter change) for a batch of real images, with IG or DLG, and writes
``results.json``, ``table.md`` (PSNR / SSIM per method and variant, shaped
like the paper's Table 3) and ``grid.png`` (ground truth in the first row,
then one row per attack, like the paper's Figure 5) to the output directory.
Models are taken at initialisation, or from a ``hyperfl_fast.train`` checkpoint.
Against HyperFL, ``--attack joint`` (an honest-but-curious server reading theta and d_theta off the upload)
and ``--attack imprint`` (a malicious server sending a crafted hypernetwork) also run on a client's real round
(``--setting real-round``), on the sum of several clients' uploads (``--clients-summed``, secure aggregation)
and against clients that check what they receive (``--psi-check``); see :mod:`hyperfl_fast.privacy.analytic`.
The DP baselines' uploads are noised as in training (per-sample clipping to
``--dp-clip``, Gaussian noise with the noise multiplier ``--sigma``, by default
the one the paper's setting needs to spend ``--epsilon``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from .backbones import BACKBONES, lpm_spec
from .checkpoint import check_writable, load_checkpoint, write_json
from .config import Config
from .data import DATASETS, DatasetError, load_dataset
from .models import HyperNetwork, TargetCNN, cnn_spec, init_hyperfl
from .progress import progress_bar
from .privacy.attacks import DEFAULT_TV_WEIGHT, TV_WEIGHT, AttackBudget, LocalTraining, reconstruct
from .privacy.lpips import LPIPS
from .privacy.metrics import match_to_ground_truth, psnr, ssim
from .dp import dp_steps, noise_multiplier, sample_rate
from .privacy.analytic import (RealRound, crafted_psi, evasive_psi, imprint_scenario, imprint_theta,
                               joint_scenario)
from .privacy.metrics import best_matches
from .privacy.threats import HyperFLClient, cnn_scenario, fedavg_scenario, hyperfl_scenario, lpm_scenario
from .engines import check_format
from .methods import ATTACK, get_method, method_names, psi_check

VARIANTS = ("a", "b", "c")
PAPER = Config()  # the paper's settings, which the attacked client trains with
PAPER_DP_SAMPLE_RATE = sample_rate(600, PAPER.batch_size)  # batch 50 of a Fashion-MNIST client's 600 samples
# the DP-SGD steps of the paper's run: 200 rounds of 5 local epochs of ceil(600 / 50) steps
PAPER_DP_STEPS = dp_steps(600, PAPER.batch_size, 200, PAPER.local_epochs)
VARIANT_NAMES = {"a": "IG, unknown embedding + classifier", "b": "white-box (true embedding + classifier)",
                 "c": "structure-aware (rank-one heads)", "joint": "joint: theta and d_theta read off, then IG",
                 "imprint": "imprint: malicious psi, trap rows",
                 "imprint-evasive": "imprint, evading the psi check"}
ATTACKS = {"ig": "IG (cosine + TV, Adam) on each --method's upload", "dlg": "DLG (L2, L-BFGS) on each upload",
           "joint": "HyperFL, honest server: theta and d_theta read off the upload, then IG",
           "imprint": "HyperFL, malicious server: a crafted psi makes fc1 trap rows; their inputs are inverted",
           "imprint-evasive": "imprint with embedding-dependence added to fc1 so that --psi-check passes"}
HYPERFL_ONLY = ("joint", "imprint", "imprint-evasive")
MAX_MATCHED, MAX_IMPRINT = 8, 64  # IG / DLG / joint pair reconstructions with images exhaustively
AUXILIARY_IMAGES = 2000  # imprint: public test images the server calibrates its trap rows on
RECOVERED_DB = 20.0  # an image counts as recovered when its best reconstruction reaches this PSNR
GRID_COLUMNS = 8  # the figure shows the first images of the attacked batch


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyperfl_fast.attack", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", nargs="+", default=["fedavg", "hyperfl"], choices=method_names(ATTACK),
                   help="whose upload to attack")
    p.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="HyperFL attack variants")
    p.add_argument("--setting", nargs="+", default=["step"], choices=["step", "round", "real-round"],
                   help="step: the upload is one gradient; round: the change after --local-steps SGD steps on the "
                        "batch; real-round (joint, imprint): the client's whole round as HyperFL trains it, one "
                        "classifier epoch then 5 hypernetwork epochs of batches of 50 over its local-size images "
                        "(600 on fmnist)")
    p.add_argument("--local-steps", type=int, default=5, help="local SGD steps in the 'round' setting")
    p.add_argument("--backbone", default=None, choices=list(BACKBONES),
                   help="hyperfl-lpm: the frozen backbone of the attacked client, which the server knows (default: "
                        "resnet18)")
    p.add_argument("--backbone-weights", default=None,
                   help="hyperfl-lpm: a local state dict of the backbone's weights (default: random, from --seed)")
    p.add_argument("--dataset", default="fmnist", choices=list(DATASETS), help="where the private images come from")
    p.add_argument("--data-dir", default="data", help="dataset folder (as for hyperfl_fast.train)")
    p.add_argument("--batch-size", type=int, default=1,
                   help=f"images in the attacked batch (1 to {MAX_MATCHED}; imprint alone: up to {MAX_IMPRINT})")
    p.add_argument("--attack", nargs="+", default=["ig"], choices=list(ATTACKS),
                   help="; ".join(f"{k}: {v}" for k, v in ATTACKS.items()))
    p.add_argument("--clients-summed", nargs="+", type=int, default=[1],
                   help="joint and imprint: the server sees the sum of this many clients' uploads (secure "
                        "aggregation, simulated in-process; the other clients hold other images)")
    p.add_argument("--psi-check", action=argparse.BooleanOptionalAction, default=False,
                   help="joint and imprint: each client checks the hypernetwork it receives first and refuses one "
                        "whose weights barely depend on its embedding (hyperfl_fast.train --psi-check)")
    p.add_argument("--iterations", type=int, default=1000, help="optimisation steps per restart")
    p.add_argument("--restarts", type=int, default=1,
                   help="random restarts; the best match is kept and every restart's PSNR reported")
    p.add_argument("--tv", type=float, default=None,
                   help="total-variation weight (IG; default: the dataset's measured one, "
                        f"{', '.join(f'{k} {v:g}' for k, v in TV_WEIGHT.items())}, else {DEFAULT_TV_WEIGHT:g})")
    p.add_argument("--signed", action=argparse.BooleanOptionalAction, default=True,
                   help="IG: Adam takes the sign of the images' gradient (breaching's signed steps)")
    p.add_argument("--epsilon", type=float, default=PAPER.epsilon,
                   help="DP methods: the privacy budget that sets the noise")
    p.add_argument("--delta", type=float, default=PAPER.delta, help="DP methods: delta of the budget")
    p.add_argument("--dp-clip", type=float, default=PAPER.dp_clip, help="DP methods: per-sample gradient norm bound C")
    p.add_argument("--sigma", type=float, default=None,
                   help="DP methods: noise multiplier (default: what spends --epsilon over the paper's run, "
                        f"{PAPER_DP_STEPS} steps at sample rate {PAPER_DP_SAMPLE_RATE:.4f})")
    p.add_argument("--checkpoint", default=None, help="attack the models in a hyperfl_fast.train checkpoint.pt")
    p.add_argument("--client", type=int, default=0, help="which client's private parts a checkpoint provides")
    p.add_argument("--lpips-alexnet", default=None, help="local torchvision AlexNet weights (state dict) for LPIPS")
    p.add_argument("--lpips-linear", default=None, help="local LPIPS linear-layer weights for AlexNet (alex.pth)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the attack runs (auto: the GPU when there is one)")
    p.add_argument("--seed", type=int, default=0, help="picks the images and the attack's random starts")
    p.add_argument("--output-dir", default="runs/attack", help="where results.json, table.md and grid.png go")
    return p


def attack_device(name: str) -> torch.device:
    """The device for ``--device`` (auto: CUDA when available)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_checkpoint(args) -> dict:
    """The training checkpoint named by ``--checkpoint``, verified, and checked against --method and --client."""
    path = Path(args.checkpoint)
    if not path.is_file():
        raise ValueError(f"--checkpoint {path}: no such file (pass a checkpoint.pt written by hyperfl_fast.train)")
    state, _ = load_checkpoint(path, torch.device("cpu"), advice="pass a checkpoint.pt written by hyperfl_fast.train")
    saved = state["config"]
    wrong = [m for m in args.method if m != saved["method"]]
    if wrong:
        raise ValueError(f"--checkpoint {path} holds a {saved['method']} run; it cannot serve "
                         f"--method {' '.join(wrong)}")
    engine = state["engine"]
    try:
        check_format(engine)
    except ValueError as exc:
        raise ValueError(f"--checkpoint {path}: {exc}") from None
    method = get_method(saved["method"])
    if method.keeps:  # the attacked client's private part comes from the checkpoint
        if not engine["clients"]:
            raise ValueError(f"--checkpoint {path} holds no client state (a Flower server's checkpoint); pass one "
                             "written by hyperfl_fast.train")
    if (method.keeps or method.sends_per_client) and not 0 <= args.client < saved["clients"]:
        raise ValueError(f"--client {args.client}: {path} holds clients 0 to {saved['clients'] - 1}")
    return state


def load_models(args, spec, device):
    """(TargetCNN, (hypernet, embedding, classifier)) on ``device``: from a checkpoint or freshly made.

    The TargetCNN is what FedAvg and the DP baselines' clients train."""
    if args.client < 0:
        raise ValueError(f"--client must be non-negative, got {args.client}")
    cfg = Config(dataset=args.dataset, clients=args.client + 1, seed=args.seed)
    torch.manual_seed(args.seed)
    fedavg_model = TargetCNN(spec)
    hypernet, embeddings, classifiers = init_hyperfl(spec, cfg.clients, cfg.embed_dim, cfg.hidden_dim,
                                                     torch.device("cpu"))
    embedding, classifier = embeddings[args.client].detach(), classifiers[args.client]
    if args.checkpoint:
        state = read_checkpoint(args)
        engine = state["engine"]  # every engine's (and the Flower server's) one layout
        shared, private = engine["global"], engine["clients"][args.client] if engine["clients"] else {}
        try:
            if get_method(state["config"]["method"]).threat == "hypernetwork":
                hypernet, embedding, classifier = _hyperfl_parts(shared, private, spec)
            else:  # the CNN the client trains: what the server sends it, with its own classifier where it has one
                sent = get_method(state["config"]["method"]).send(spec, shared, args.client) if shared else {}
                wanted = dict(fedavg_model.named_parameters())
                fedavg_model.load_state_dict({k: t for k, t in {**sent, **private}.items() if k in wanted})
        except (KeyError, RuntimeError, ValueError) as exc:
            raise ValueError(f"--checkpoint {args.checkpoint} holds a {state['config']['dataset']} model, which "
                             f"does not fit --dataset {args.dataset} ({str(exc).splitlines()[0][:100]})") from None
    return fedavg_model.to(device), (hypernet.to(device), embedding.to(device), classifier.to(device))


def _hyperfl_parts(psi: dict, private: dict, spec):
    """The global hypernetwork and one client's embedding and classifier as modules."""
    hypernet = HyperNetwork(*psi["fc.weight"].shape[::-1], psi["heads.weight"].shape[0])
    hypernet.load_state_dict(psi)
    if hypernet.heads.out_features != spec.num_feature_params:
        raise ValueError(f"it generates {hypernet.heads.out_features} weights, the model needs "
                         f"{spec.num_feature_params}")
    classifier = nn.Linear(spec.hidden, spec.num_classes)
    classifier.load_state_dict({"weight": private["classifier.weight"], "bias": private["classifier.bias"]})
    return hypernet, private["embedding"], classifier


def check_args(args) -> None:
    """Every flag's range, before any work: a ValueError naming the flag."""
    imprint_only = all(a.startswith("imprint") for a in args.attack)
    largest = MAX_IMPRINT if imprint_only else MAX_MATCHED
    if not 1 <= args.batch_size <= largest:
        raise ValueError(f"--batch-size must be between 1 and {largest}"
                         + ("" if imprint_only else f" ({MAX_IMPRINT} with --attack imprint alone)")
                         + f", got {args.batch_size}")
    for name in ("iterations", "restarts", "local_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(n <= 0 for n in args.clients_summed):
        raise ValueError(f"--clients-summed must be positive, got {' '.join(map(str, args.clients_summed))}")
    hyperfl_attacks = [a for a in args.attack if a in HYPERFL_ONLY]
    if hyperfl_attacks and "hyperfl" not in args.method:
        raise ValueError(f"--attack {' '.join(hyperfl_attacks)} attacks HyperFL's upload: add hyperfl to --method")
    if "real-round" in args.setting and set(args.attack) - set(HYPERFL_ONLY):
        raise ValueError(f"--setting real-round applies to --attack {', '.join(HYPERFL_ONLY)} only")
    for flag, given in (("--clients-summed", args.clients_summed != [1]), ("--psi-check", args.psi_check)):
        if given and not hyperfl_attacks:
            raise ValueError(f"{flag} applies to --attack {', '.join(HYPERFL_ONLY)}, not to "
                             f"{' '.join(args.attack)}")
    if "hyperfl-lpm" not in args.method and (args.backbone or args.backbone_weights):
        raise ValueError("--backbone and --backbone-weights apply to --method hyperfl-lpm only")
    if "hyperfl-lpm" in args.method:
        if args.checkpoint:
            raise ValueError("--checkpoint: attacking a trained hyperfl-lpm run is not supported yet; drop "
                             "--checkpoint to attack the models at initialisation")
    if max(args.clients_summed) > 1 and args.checkpoint:
        raise ValueError("--clients-summed above 1 draws the other clients afresh; it does not combine with "
                         "--checkpoint")
    if (args.lpips_alexnet is None) != (args.lpips_linear is None):
        raise ValueError("LPIPS needs both --lpips-alexnet and --lpips-linear (or neither)")
    for name in ("epsilon", "dp_clip", "sigma"):
        value = getattr(args, name)
        if value is not None and not 0 < value < float("inf"):
            raise ValueError(f"--{name.replace('_', '-')} must be a positive finite number, got {value}")
    if not 0 < args.delta < 1:
        raise ValueError(f"--delta must be in (0, 1), got {args.delta}")
    if args.tv is not None and not 0 <= args.tv < float("inf"):
        raise ValueError(f"--tv must be a non-negative finite number, got {args.tv}")


def other_clients(spec, count: int, seed: int, device) -> list[tuple[torch.Tensor, nn.Linear]]:
    """Private parts (embedding, classifier) of ``count`` further clients, drawn as a run's independent start."""
    torch.manual_seed(seed + 1)
    _, embeddings, classifiers = init_hyperfl(spec, count, PAPER.embed_dim, PAPER.hidden_dim, torch.device("cpu"),
                                              shared=False)
    return [(v.detach().to(device), c.to(device)) for v, c in zip(embeddings, classifiers)]


def run_attacks(args, log=print) -> dict:
    """Run every requested attack; returns the results and writes them to ``args.output_dir``."""
    check_args(args)
    if args.tv is None:
        args.tv = TV_WEIGHT.get(args.dataset, DEFAULT_TV_WEIGHT)
    sigma = args.sigma
    if sigma is None and any(get_method(m).dp for m in args.method) and {"ig", "dlg"} & set(args.attack):
        sigma = noise_multiplier(args.epsilon, args.delta, PAPER_DP_SAMPLE_RATE, PAPER_DP_STEPS)
        log(f"DP uploads: noise multiplier {sigma:.3f} (epsilon {args.epsilon:g}, delta {args.delta:g}), "
            f"clip {args.dp_clip:g}")
    device = attack_device(args.device)
    check_writable(Path(args.output_dir))
    lpips = LPIPS(args.lpips_alexnet, args.lpips_linear) if args.lpips_alexnet else None
    dataset = load_dataset(args.dataset, args.data_dir)
    spec = cnn_spec(dataset.in_channels, dataset.num_classes)
    gen = torch.Generator().manual_seed(args.seed)
    summed = max(args.clients_summed) if set(args.attack) & set(HYPERFL_ONLY) else 1
    per_client = max(args.batch_size, dataset.local_size if "real-round" in args.setting else 0)
    if per_client * summed > len(dataset.train_labels):
        raise ValueError(f"--clients-summed {summed} x {per_client} images per client needs {per_client * summed} "
                         f"images; {args.dataset} has {len(dataset.train_labels)}")
    pick = torch.randperm(len(dataset.train_labels), generator=gen)[:per_client * summed]
    images_all = dataset.normalize(dataset.train_images[pick]).to(device)  # every summed client's, in order
    labels_all = dataset.train_labels[pick].to(device)
    x, y = images_all[:args.batch_size], labels_all[:args.batch_size]  # the attacked client's private batch
    mean, std = torch.tensor(dataset.mean).view(-1, 1, 1), torch.tensor(dataset.std).view(-1, 1, 1)
    bounds = ((0 - mean) / std, (1 - mean) / std)

    def as_images(images):  # in [0, 1]
        return (images.cpu() * std + mean).clamp(0, 1)

    truth = as_images(x)
    fedavg_model, (hypernet, embedding, classifier) = load_models(args, spec, device)
    budget = AttackBudget(args.iterations, args.restarts, tv_weight=args.tv, seed=args.seed, signed=args.signed)
    psi = {k: t.detach() for k, t in hypernet.state_dict().items()}
    others = other_clients(spec, summed - 1, args.seed, device) if summed > 1 else []

    def hyperfl_clients(n: int, b: int) -> list[HyperFLClient]:
        """The attacked client and n - 1 others, ``b`` images each (all the server's sum holds)."""
        parts = [(embedding, classifier)] + others[:n - 1]
        return [HyperFLClient(v, c, images_all[i * per_client:i * per_client + b],
                              labels_all[i * per_client:i * per_client + b]) for i, (v, c) in enumerate(parts)]

    rows, images = [], []
    for setting in args.setting:
        steps = {"step": 1, "round": args.local_steps}.get(setting)
        per_image = dataset.local_size if setting == "real-round" else args.batch_size
        scenarios = []  # (method, variant, attack, scenario or the reason every client refused, clients summed)
        for attack in args.attack:
            if attack in HYPERFL_ONLY:
                training = RealRound(Config(dataset=args.dataset, seed=args.seed), dataset.augment) \
                    if setting == "real-round" \
                    else LocalTraining(steps, clip=PAPER.grad_clip)
                for n in args.clients_summed:
                    clients = hyperfl_clients(n, per_image)
                    scenarios.append(("hyperfl", attack, attack, n, *hyperfl_attack(
                        attack, spec, psi, clients, training, dataset, bounds, args, device)))
                continue
            for method in args.method:  # each method's upload, by the threat model it declares
                scenarios += [(method, variant, attack, 1, scenario, None)
                              for variant, scenario in method_scenarios(method, args, spec, fedavg_model, hypernet,
                                                                        embedding, classifier, x, y, steps, sigma)]
        for method, variant, attack, n, scenario, refused in scenarios:
            row = {"method": method, "variant": variant, "attack": attack, "clients_summed": n,
                   "variant_name": VARIANT_NAMES.get(variant, attack.upper()), "setting": setting}
            # the images the attack targets: one per reconstruction (the attacked client's batch), or for
            # candidates (imprint, a real round) every image the server's sum holds, each scored by its best one
            targets = truth if scenario is not None and scenario.shape is None or refused and attack == "joint" \
                else as_images(torch.cat([c.x for c in hyperfl_clients(n, per_image)]))
            if refused:
                log(f"{method} {variant} ({setting}, {n} clients summed): {refused}")
                rows.append({**row, "refused": refused, "psnr": None, "ssim": None, "lpips": None, "recovered": 0,
                             "images": len(targets), "psnr_restarts": []})
                images.append(torch.zeros_like(truth))
                continue
            log(f"attacking {scenario.name} ({setting}, {attack}, {n} clients summed, {args.iterations} iterations)")
            rec = reconstruct(scenario.simulate, scenario.observed, scenario.shape or tuple(x.shape),
                              spec.num_classes, bounds, scenario.labels, scenario.unknowns,
                              "dlg" if attack == "dlg" else "ig", budget, progress=progress_bar(scenario.name))

            def scored(reconstruction: torch.Tensor) -> torch.Tensor:  # one image per target, in its order
                matcher = match_to_ground_truth if scenario.shape is None else best_matches
                return matcher(as_images(reconstruction), targets)

            recon = scored(rec.images)
            scores, s = psnr(recon, targets), ssim(recon, targets)
            rows.append({**row, "psnr": scores.mean().item(), "ssim": s.mean().item(),
                         "lpips": lpips(recon, targets).mean().item() if lpips else None,
                         "recovered": int((scores >= RECOVERED_DB).sum()), "images": len(scores),
                         "psnr_per_image": scores.tolist(), "ssim_per_image": s.tolist(),
                         "matching_loss": rec.matching_loss, "seconds": rec.seconds,
                         "psnr_restarts": [psnr(scored(r.images), targets).mean().item() for r in rec.restarts],
                         **scenario.diagnostics})
            images.append(recon[:len(truth)])
            log(f"  PSNR {scores.mean().item():.2f} dB | recovered {rows[-1]['recovered']}/{len(scores)} | "
                f"{rec.seconds:.0f} s")
    results = {"config": vars(args), "ground_truth_labels": y.tolist(), "rows": rows}
    write_outputs(Path(args.output_dir), results, truth, images)
    return results


def method_scenarios(method, args, spec, fedavg_model, hypernet, embedding, classifier, x, y, steps, sigma):
    """(variant, scenario) for IG / DLG on ``method``'s upload, by the threat model it declares."""
    threat = get_method(method).threat
    own = get_method(method).client_optimizer  # pFedHN's client SGD, where it is not the paper's
    if threat == "lpm-hypernetwork":
        return [("c", hyperfl_lpm_scenario(args, spec.num_classes, x, y, steps))]
    if threat == "full-model":
        return [("", fedavg_scenario(fedavg_model, x, y, LocalTraining(steps, **own), method))]
    if threat == "hypernetwork":
        return [(variant, hyperfl_scenario(spec, hypernet, embedding, classifier, x, y,
                                           LocalTraining(steps, clip=PAPER.grad_clip), variant))
                for variant in args.variant]
    # a CNN the client trains: noised with DP-SGD, or (pfedhn-pc) the representation as it is
    training = LocalTraining(steps, dp_clip=args.dp_clip, dp_sigma=sigma) if get_method(method).dp \
        else LocalTraining(steps, **own)
    return [("", cnn_scenario(method, fedavg_model, x, y, training, args.seed))]


def hyperfl_lpm_scenario(args, num_classes: int, x: torch.Tensor, y: torch.Tensor, steps: int):
    """HyperFL-LPM's structure-aware attack (:func:`lpm_scenario`) on a client of a run at initialisation: the
    backbone (random from ``--seed`` or ``--backbone-weights``), psi and the client's embedding and head drawn as
    ``hyperfl_fast.train`` draws them; the client trains with the authors' lr for the backbone."""
    backbone = args.backbone or "resnet18"
    cfg = Config(method="hyperfl-lpm", dataset=args.dataset, backbone=backbone, seed=args.seed, clients=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        try:
            spec = lpm_spec(backbone, num_classes, x.device, args.backbone_weights)
        except ImportError as exc:  # timm (or torchvision) missing
            raise ValueError(str(exc)) from None
    torch.manual_seed(args.seed)
    psi, privates = get_method("hyperfl-lpm").init_states(spec, 1, cfg, x.device)
    training = LocalTraining(steps, lr=BACKBONES[backbone].lr, clip=PAPER.grad_clip)
    return lpm_scenario(spec, psi, privates[0], x, y, training)


def hyperfl_attack(attack, spec, psi, clients, training, dataset, bounds, args, device):
    """(scenario, None) for ``joint`` or ``imprint`` on the sum of ``clients``' uploads, or (None, why) when
    every client refused the psi it received (``--psi-check``)."""
    if attack.startswith("imprint"):
        auxiliary = dataset.normalize(dataset.test_images[:AUXILIARY_IMAGES]).to(device)  # public images
        gen = torch.Generator().manual_seed(args.seed)
        theta_star = imprint_theta(spec, auxiliary, float(bounds[0].min()), sum(len(c.x) for c in clients),
                                   gen).to(device)
        if attack == "imprint":
            sent = crafted_psi(psi, theta_star)
        else:  # embedding-dependence where the attack does not need its absence, sized to pass the check
            probes = torch.randn(64, psi["fc.weight"].shape[1], generator=gen).to(device)
            sent = evasive_psi(psi, theta_star, spec, probes, 10 * psi_check.SENSITIVITY_FLOOR, gen)
        scenario = imprint_scenario(spec, sent, clients, training)
    else:
        scenario = joint_scenario(spec, psi, clients, training,
                                  args.batch_size if isinstance(training, RealRound) else None)
        sent = psi
    if args.psi_check:
        reasons = psi_check.refusals(sent, torch.stack([c.embedding for c in clients]))
        if all(reasons):
            return None, f"every client refused the psi it received: {reasons[0]}"
        if any(reasons):
            raise ValueError("some clients refused and some accepted: not a case this CLI simulates")
    return scenario, None


def markdown_table(rows: list[dict]) -> str:
    """Rows method/attack/setting/clients summed; columns PSNR, SSIM, LPIPS (as the paper's Table 3), the
    images recovered (PSNR at least ``RECOVERED_DB``) and the PSNR's spread over restarts (the best-matching
    restart is the row's)."""
    lines = ["| method | attack | setting | clients summed | PSNR (dB) | SSIM | LPIPS | "
             f"recovered (PSNR ≥ {RECOVERED_DB:g} dB) | PSNR over restarts (dB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['method']} | {r['variant_name']} | {r['setting']} | {r['clients_summed']} |"
        if r.get("refused"):
            lines.append(f"{head} refused | refused | refused | 0/{r['images']} | {r['refused']} |")
            continue
        lpips = f"{r['lpips']:.3f}" if r["lpips"] is not None else \
            "not computed (needs local pretrained weights: --lpips-alexnet, --lpips-linear)"
        spread = r["psnr_restarts"]
        spread = f"{min(spread):.2f}-{max(spread):.2f} ({len(spread)})" if len(spread) > 1 else "one restart"
        lines.append(f"{head} {r['psnr']:.2f} | {r['ssim']:.3f} | {lpips} | {r['recovered']}/{r['images']} | "
                     f"{spread} |")
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, results: dict, truth: torch.Tensor, reconstructions: list[torch.Tensor]) -> None:
    """results.json, table.md and grid.png (ground truth, then one labelled row per attack)."""
    write_json(out / "results.json", results)
    (out / "table.md").write_text(markdown_table(results["rows"]))
    plot_grid(out / "grid.png", truth, reconstructions, results["rows"], results["ground_truth_labels"])


def plot_grid(path: Path, truth: torch.Tensor, reconstructions: list[torch.Tensor], rows: list[dict],
              labels: list[int]) -> None:
    """Save :func:`grid_figure` as a PNG."""
    import matplotlib.pyplot as plt

    fig = grid_figure(truth, reconstructions, rows, labels)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def grid_figure(truth: torch.Tensor, reconstructions: list[torch.Tensor], rows: list[dict], labels: list[int]):
    """A figure a person can read: each row names its attack, each reconstruction shows its PSNR and SSIM.

    truth and each reconstruction are (B, C, H, W) in [0, 1]; ``rows`` are the results' rows, in order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(truth.shape[0], GRID_COLUMNS)
    fig, axes = plt.subplots(1 + len(rows), batch, figsize=(1.9 * batch + 1.6, 2.0 * (1 + len(rows))),
                             squeeze=False)
    captions = [[f"label {label}" for label in labels]]
    captions += [["refused" if r.get("refused") else f"PSNR {p:.1f} dB\nSSIM {s:.3f}"
                  for p, s in zip(r.get("psnr_per_image", [0] * batch), r.get("ssim_per_image", [0] * batch))]
                 for r in rows]
    names = ["ground truth"] + [f"{r['method']}\n{r['variant_name']}\n{r['setting']}"
                                + (f", {r['clients_summed']} summed" if r.get("clients_summed", 1) > 1 else "")
                                for r in rows]
    for row, (images, name) in enumerate(zip([truth, *reconstructions], names)):
        for col in range(batch):
            ax = axes[row][col]
            image = images[col].permute(1, 2, 0).squeeze(-1).numpy()  # (H, W) or (H, W, 3)
            ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(captions[row][col], fontsize=8)
            if col == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return fig


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
