"""HyperFL-LPM: a round's cost on a frozen ResNet-18 or ViT-S/16 (issue 22), with its floor.

    python benchmarks/lpm_round.py --backbone resnet18 --clients 20 --samples 600 --local-epochs 5
    python benchmarks/lpm_round.py --backbone vit-s16 --clients 2 --samples 16 --local-epochs 1

On a lent GPU (one device call, after ``gpu_session.sh``; timm is in the device image):

    python3 benchmarks/lpm_round.py --backbone resnet18 --repeats 2 &&
    python3 benchmarks/lpm_round.py --backbone vit-s16 --samples 64 --local-epochs 1

Random backbones and random 32x32 RGB data (the cost does not depend on the weights).  Reports, for the
lockstep engine (every client at once, one generation call per step):

* the floor: the backbone's FLOPs per image (forward, and forward + the backward to the adapters a training
  step needs, counted by ``torch.utils.flop_counter``), the generated values per round and their FLOPs;
* the measured round (median of ``--repeats``), seconds per step, the share of the round spent generating
  adapters (every ``ops.generate_weights`` / ``LockstepHypernetwork.generate`` call, timed synchronised),
  and the peak memory (CUDA: allocated; CPU: the process's peak resident set).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from hyperfl_fast import ops
from hyperfl_fast.backbones import backbone_features, client_adapt, lpm_spec
from hyperfl_fast.config import Config
from hyperfl_fast.engines import build_batched
from hyperfl_fast.federation import ClientData
from hyperfl_fast.lockstep.hypernet import LockstepHypernetwork
from hyperfl_fast.methods import hyperfl_lpm
from hyperfl_fast.models import split_flat


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def generation_timer(device, seconds: list[float]):
    """Time every adapter generation of the engine (both of its generation calls), synchronised."""
    originals = (ops.generate_weights, LockstepHypernetwork.generate)

    def timed(fn):
        def call(*args, **kwargs):
            sync(device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(device)
            seconds.append(time.perf_counter() - start)
            return out
        return call

    hyperfl_lpm.ops.generate_weights = timed(originals[0])
    LockstepHypernetwork.generate = timed(originals[1])
    try:
        yield
    finally:
        hyperfl_lpm.ops.generate_weights, LockstepHypernetwork.generate = originals


def flops_per_image(spec, device) -> tuple[float, float]:
    """The backbone's FLOPs for one 32x32 image: forward, and forward + backward to the adapters."""
    x = torch.randn(2, 3, 32, 32, device=device)
    theta = torch.zeros(spec.num_feature_params, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            backbone_features(x, spec, client_adapt(split_flat(theta, spec.adapter_shapes()), spec))
    with FlopCounterMode(display=False) as step:
        features = backbone_features(x, spec, client_adapt(split_flat(theta, spec.adapter_shapes()), spec))
        torch.autograd.grad(features.sum(), theta)
    return forward.get_total_flops() / len(x), step.get_total_flops() / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--samples", type=int, default=600, help="training samples per client")
    p.add_argument("--test", type=int, default=16, help="test samples per client")
    p.add_argument("--local-epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = Config(dataset="synthetic-rgb", method="hyperfl-lpm", backbone=args.backbone, clients=args.clients,
                 local_epochs=args.local_epochs, batch_size=args.batch_size, device=device.type).validate()
    torch.manual_seed(0)
    spec = lpm_spec(args.backbone, 10, device)
    gen = torch.Generator().manual_seed(0)
    clients = [ClientData(c, torch.randn(args.samples, 3, 32, 32, generator=gen).to(device),
                          torch.randint(0, 10, (args.samples,), generator=gen).to(device),
                          torch.randn(args.test, 3, 32, 32, generator=gen).to(device),
                          torch.randint(0, 10, (args.test,), generator=gen).to(device), False)
               for c in range(args.clients)]
    engine = build_batched(spec, clients, cfg, device)
    forward, step = flops_per_image(spec, device)
    steps = -(-args.samples // args.batch_size) * (args.local_epochs + 1)  # lockstep steps per round
    images = steps * args.batch_size * args.clients + 2 * args.test * args.clients  # + two evaluations
    generations = args.local_epochs * (steps // (args.local_epochs + 1)) + 3  # per step, + head phase + two evals
    values = generations * args.clients * spec.num_feature_params

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rounds, generating = [], []
    for r in range(args.repeats):
        with generation_timer(device, generating):
            sync(device)
            start = time.perf_counter()
            engine.run_round(r, list(range(args.clients)))
            sync(device)
        rounds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    median = statistics.median(rounds)
    print(json.dumps({
        "backbone": args.backbone, "device": torch.cuda.get_device_name() if device.type == "cuda" else
        f"cpu ({platform.processor() or 'x86_64'}, {torch.get_num_threads()} threads)", "torch": torch.__version__,
        "clients": args.clients, "samples": args.samples, "local_epochs": args.local_epochs,
        "batch_size": args.batch_size, "generated_values_per_client": spec.num_feature_params,
        "floor": {"backbone_gflops_per_image_forward": forward / 1e9,
                  "backbone_gflops_per_image_train_step": step / 1e9,
                  "round_backbone_tflops": (steps * args.batch_size * args.clients * step
                                            + 2 * args.test * args.clients * forward) / 1e12,
                  "generated_values_per_round": values,
                  "generation_gflops_per_round": 2 * values * cfg.hidden_dim / 1e9},
        "round_seconds": rounds, "round_seconds_median": median, "seconds_per_step": median / steps,
        "generation_share": sum(generating) / len(rounds) / median, "peak_memory_gib": peak,
        "images_per_round": images}, indent=1))


if __name__ == "__main__":
    main()
