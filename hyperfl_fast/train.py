"""Command line: ``python -m hyperfl_fast.train [flags]``.

Trains HyperFL (or the ``fedavg`` / ``local`` baselines) on a partitioned
dataset, logs one line per round, writes ``metrics.json`` / ``metrics.csv``
and a per-round checkpoint to the output directory, and prints a summary.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from .backbones import BACKBONES
from .config import CLIENT_INITS, DEFAULT_ROUNDS, ENGINES, Config, ConfigError
from .data import DATASETS, DatasetError
from .interrupts import graceful_interrupts
from .methods import HEADLINE_NAMES, METHODS, POISSON, get_method, method_names
from .runner import TrainingDiverged, completed_rounds, output_dir_for, run


def build_parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m hyperfl_fast.train", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=d.dataset, help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--method", default=d.method, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--engine", default=d.engine,
                   help=f"one of: {', '.join(ENGINES)} (batched: all clients in lockstep; reference: one by one)")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="communication rounds (paper: 200)")
    p.add_argument("--clients", type=int, default=d.clients, help="number of clients")
    p.add_argument("--frac", type=float, default=d.frac, help="fraction of clients sampled per round, in (0, 1]")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs,
                   help="local epochs per round (hyperfl: hypernetwork-phase epochs, after 1 classifier epoch)")
    p.add_argument("--batch-size", type=int, default=argparse.SUPPRESS,
                   help=f"(default: {d.batch_size}; with --backbone the authors' 16)")
    p.add_argument("--lr", type=float, default=argparse.SUPPRESS,
                   help=f"hypernetwork/embedding (hyperfl, hyperfl-lpm) or model learning rate (default: {d.lr}; "
                        f"with --backbone the authors' {', '.join(f'{b.lr:g} for {n}' for n, b in BACKBONES.items())})")
    p.add_argument("--classifier-lr", type=float, default=d.classifier_lr, help="hyperfl classifier-phase lr")
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="hyperfl gradient-norm clip")
    p.add_argument("--epsilon", type=float, default=d.epsilon,
                   help="DP methods: target epsilon over the whole run (each client's sigma is derived with Opacus "
                        "from the steps it takes). dp-fedavg: a record-level budget; ppsgd, centaur: it covers the "
                        "representation's DP-SGD steps given the classifier, as the authors report it, not the "
                        "client's records (the classifier trains on them without noise)")
    p.add_argument("--delta", type=float, default=d.delta, help="DP methods: target delta")
    p.add_argument("--dp-clip", type=float, default=d.dp_clip, help="DP methods: per-example gradient norm bound")
    p.add_argument("--poisson", action="store_true",
                   help=f"{', '.join(method_names(POISSON))}: Poisson-sampled DP-SGD batches, the sampling the "
                        "accountant assumes (default: shuffled batches, as the authors' code; epsilon is then nominal). "
                        "The epsilon is then exact for what it covers (see --epsilon)")
    p.add_argument("--dp-noise", default=d.dp_noise,
                   help="DP methods: secure (each client's noise from a generator seeded by the OS: private) or keyed "
                        "(reproducible from --seed, for checks and simulation: NOT private)")
    p.add_argument("--embed-dim", type=int, default=d.embed_dim, help="client embedding size (pfedhn: 1 + N/4, fixed)")
    p.add_argument("--hidden-dim", type=int, default=d.hidden_dim, help="hypernetwork hidden size (pfedhn: 100, fixed)")
    p.add_argument("--client-init", default=d.client_init,
                   help=f"one of: {', '.join(CLIENT_INITS)} (shared: every client starts from one embedding and "
                        "classifier draw, as the authors' code; independent: one draw per client, a deviation)")
    p.add_argument("--psi-check", action="store_true",
                   help="hyperfl: each client refuses a received hypernetwork whose weights barely depend on its "
                        "embedding (a malicious server's imprint attack; hyperfl_fast.methods.psi_check). Use it with "
                        "--client-init independent: from the shared start most honest clients' hidden units die in "
                        "round 1 and they would refuse")
    p.add_argument("--backbone", default=None,
                   help=f"hyperfl-lpm, local, fedavg: the frozen backbone, one of {', '.join(BACKBONES)} (vit-tiny: a 2-block ViT at "
                        "32x32 for smoke runs)")
    p.add_argument("--backbone-weights", default=None,
                   help="a local state dict of the backbone's pre-trained weights (torchvision resnet18 / timm "
                        "vit_small_patch16_384 keys; see the README); without it the backbone is random and every "
                        "log line says so. Nothing is downloaded")
    p.add_argument("--adapters", default=None,
                   help="local and fedavg with --backbone: off (default; the head on the fixed backbone, Table 2's "
                        "dagger columns) or on (adapters too, its double dagger)")
    p.add_argument("--iid", action="store_true", help="IID partition instead of the paper's non-IID one")
    p.add_argument("--iid-share", type=float, default=d.iid_share,
                   help="non-IID share s: fraction of each client's data spread over all classes")
    p.add_argument("--local-size", type=int, default=argparse.SUPPRESS,
                   help="training samples per client (default: 600; 1000 for emnist)")
    p.add_argument("--test-size", type=int, default=argparse.SUPPRESS,
                   help="test samples per client (default: 600; 300 for cifar10/cinic10)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--precision", default=d.precision,
                   help="fp32 (full float32; TF32 off in cuBLAS/cuDNN) or tf32 (TF32 tensor cores, about 1e-3 "
                        "relative error; GPU only)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="hyperfl, batched engine, CUDA: capture each local step in a CUDA graph and replay it "
                        "(experimental, off by default)")
    p.add_argument("--dispatch", default=d.dispatch,
                   help="measured or static. CUDA: measured = each op's fastest correct path (torch or Triton), timed on this GPU at its "
                        "first use and cached in ~/.cache/hyperfl_fast; static = the table measured on an H100")
    p.add_argument("--ops-path", default=None,
                   help="force a path for every op (torch, triton or reference) or per op, e.g. "
                        "conv2d_leaky_pool=triton,linear=torch (overrides --dispatch and HYPERFL_OPS_PATH)")
    p.add_argument("--data-dir", default=d.data_dir,
                   help="dataset folder: fashion-mnist/ (else /usr/share/datasets/fashion-mnist), EMNIST/raw/, "
                        "cifar-10-batches-py/, CINIC-10/")
    p.add_argument("--output-dir", default=argparse.SUPPRESS, help="(default: runs/<dataset>-<method>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of another run in --output-dir (without it, such a folder is refused)")
    return p


def parse_config(argv: list[str] | None = None) -> tuple[Config, dict]:
    """Parse flags into a validated :class:`Config` (raises :class:`ConfigError`) and the resume/overwrite flags."""
    args = vars(build_parser().parse_args(argv))
    flags = {"resume": args.pop("resume"), "overwrite": args.pop("overwrite")}
    if args.get("backbone") in BACKBONES:  # the authors' settings for a backbone, unless given
        args.setdefault("lr", BACKBONES[args["backbone"]].lr)
        args.setdefault("batch_size", BACKBONES[args["backbone"]].batch_size)
    cfg = Config(**args)
    if cfg.dataset not in DATASETS:
        raise ConfigError(f"--dataset: unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    return cfg.validate(), flags


def summary_line(result) -> str:
    """The closing line of a run: the paper's headline figure for the method first, then both accuracies."""
    cfg, final = result.config, result.final
    seconds = sum(r["seconds"] for r in result.rounds) / len(result.rounds)
    headline = HEADLINE_NAMES[get_method(cfg.method).headline]
    return (f"done: {cfg.method} on {cfg.dataset}, {final['round']} rounds | "
            f"headline ({headline}, the figure the paper reports for {cfg.method}) {final['headline_acc']:.2f}% | "
            f"mean local accuracy {final['local_acc']:.2f}% | global-model accuracy {final['global_acc']:.2f}% | "
            f"{seconds:.1f} s/round | metrics in {result.output_dir}/metrics.json")


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run."""
    return shlex.join(["python", "-m", "hyperfl_fast.train", *[a for a in argv if a != "--overwrite"],
                       *([] if "--resume" in argv else ["--resume"])])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = None
    try:
        cfg, flags = parse_config(argv)
        with graceful_interrupts():  # Ctrl-C or SIGTERM: stop after saving; a second one: stop at once
            result = run(cfg, **flags)
    except (ConfigError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        if cfg is None:
            print("\ninterrupted before training started", file=sys.stderr)
        else:
            done = completed_rounds(output_dir_for(cfg))
            print(f"\ninterrupted in round {done + 1}: rounds 1-{done} are saved in {output_dir_for(cfg)}; "
                  f"continue with: {resume_command(argv)}" if done else
                  f"\ninterrupted in round 1, before any round was saved; start again with: "
                  f"{shlex.join(['python', '-m', 'hyperfl_fast.train', *argv])}", file=sys.stderr)
        return 130
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
