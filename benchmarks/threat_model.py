"""The threat-model table: the server's powers x attack x defence -> PSNR / SSIM and the share of images recovered.

    python benchmarks/threat_model.py attacks   # every attack row (Fashion-MNIST, models at initialisation)
    python benchmarks/threat_model.py honest    # --psi-check on honest rounds: sensitivities, refusals, accuracy

``attacks`` runs ``python -m hyperfl_fast.attack`` (its ``run_attacks``) for: FedAvg's IG and HyperFL's variant c
(the paper-style rows) and ``joint`` (an honest-but-curious server), one image, seeds 0-2; ``imprint`` (a
malicious server) for batches 1, 8 and 50 and 1, 5 and 20 clients summed (secure aggregation), seed 0; both on a
client's real round (one classifier epoch, five hypernetwork epochs of batches of 50 over 600 images); and both
under ``--psi-check``, with ``imprint-evasive`` (the attacker who knows the check).  1000 iterations, one
restart.  ``honest`` trains HyperFL with the lockstep engine for a few rounds and prints each round's smallest
and largest client sensitivity (hyperfl_fast.methods.psi_check) and how many clients the check would refuse.
Attack quality, not speed: the seconds are the development machine's.
"""
import statistics
import sys
import tempfile
import time

from hyperfl_fast.attack import build_parser, run_attacks

COMMON = ["--dataset", "fmnist", "--iterations", "1000", "--method", "hyperfl"]


def rows_of(args: list[str], seeds=(0,)) -> list[dict]:
    rows = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as out:
            parsed = build_parser().parse_args([*COMMON, *args, "--seed", str(seed), "--output-dir", out])
            rows += run_attacks(parsed, log=lambda _: None)["rows"]
    return rows


def line(label: str, rows: list[dict]) -> str:
    if rows[0].get("refused"):
        return f"| {label} | refused | refused | 0/{rows[0]['images']} | {rows[0]['refused']} |"
    psnrs = [r["psnr"] for r in rows]
    recovered = sum(r["recovered"] for r in rows)
    images = sum(r["images"] for r in rows)
    extra = ", ".join(f"{k} {rows[0][k]}" for k in ("candidates", "images_isolated", "isolated_median_error",
                                                     "fc_input_rel_error", "theta_rel_error") if k in rows[0])
    spread = f" ({min(psnrs):.1f}-{max(psnrs):.1f})" if len(psnrs) > 1 else ""
    return (f"| {label} | {statistics.median(psnrs):.1f}{spread} | {statistics.median(r['ssim'] for r in rows):.3f} | "
            f"{recovered}/{images} | {extra}; {statistics.median(r['seconds'] for r in rows):.0f} s |")


def attacks() -> None:
    print("| server, attack, setting | PSNR (dB), median (min-max) | SSIM | recovered (≥ 20 dB) | notes |\n"
          "|---|---|---|---|---|")
    seeds = (0, 1, 2)
    fedavg = rows_of(["--method", "fedavg", "--batch-size", "1"], seeds)
    print(line("honest, FedAvg IG, 1 image, step", fedavg), flush=True)
    hyper = rows_of(["--variant", "c", "--batch-size", "1"], seeds)
    print(line("honest, HyperFL variant c, 1 image, step", hyper), flush=True)
    for setting in ("step", "round"):
        print(line(f"honest, HyperFL joint, 1 image, {setting}",
                   rows_of(["--attack", "joint", "--batch-size", "1", "--setting", setting], seeds)), flush=True)
    for n in (5, 20):
        print(line(f"honest, HyperFL joint, 1 image, step, {n} clients summed",
                   rows_of(["--attack", "joint", "--batch-size", "1", "--clients-summed", str(n)])), flush=True)
    for batch in (1, 8, 50):
        for n in (1, 5, 20):
            print(line(f"malicious, imprint, batch {batch}, step, {n} clients summed",
                       rows_of(["--attack", "imprint", "--batch-size", str(batch), "--clients-summed", str(n)])),
                  flush=True)
    print(line("malicious, imprint, batch 8, round (5 steps)",
               rows_of(["--attack", "imprint", "--batch-size", "8", "--setting", "round"])), flush=True)
    print(line("honest, HyperFL joint, real round (600 images, 8 reconstructed)",
               rows_of(["--attack", "joint", "--batch-size", "8", "--setting", "real-round"])), flush=True)
    for n in (1, 5):
        print(line(f"malicious, imprint, real round (600 images), {n} clients summed",
                   rows_of(["--attack", "imprint", "--setting", "real-round", "--clients-summed", str(n)])),
              flush=True)
    for attack in ("imprint", "imprint-evasive"):
        for batch in (1, 8):
            print(line(f"malicious, {attack}, batch {batch}, step, clients --psi-check",
                       rows_of(["--attack", attack, "--batch-size", str(batch), "--psi-check"])), flush=True)


def honest(rounds: int = 5) -> None:
    """HyperFL on Fashion-MNIST, 20 clients, the paper's settings: each round's sensitivities before training."""
    import torch

    from hyperfl_fast.config import Config
    from hyperfl_fast.engines import build_engine
    from hyperfl_fast.federation import build_clients, load_partition, sample_clients
    from hyperfl_fast.methods.psi_check import SENSITIVITY_FLOOR, embedding_sensitivity

    for client_init in ("shared", "independent"):
        cfg = Config(rounds=rounds, client_init=client_init).validate()
        dataset, splits, spec = load_partition(cfg, log=lambda _: None)
        engine = build_engine(spec, build_clients(dataset, splits, torch.device("cpu")), cfg, torch.device("cpu"))
        print(f"client-init {client_init}: round | smallest / largest sensitivity | refused (floor "
              f"{SENSITIVITY_FLOOR:g}) | mean local accuracy after the round | s for the check | s for the round")
        for r in range(rounds):
            sampled = sample_clients(cfg.clients, cfg.frac, cfg.seed, r)
            began = time.perf_counter()
            embeddings = torch.stack([engine.client_state(c)["embedding"] for c in sampled])
            s = embedding_sensitivity(engine.global_state(), embeddings)
            checked = time.perf_counter()
            results = engine.run_round(r, sampled)
            acc = sum(x.local_acc for x in results) / len(results)
            print(f"{r + 1} | {s.min():.3f} / {s.max():.3f} | {int((s < SENSITIVITY_FLOOR).sum())} | {acc:.2f} | "
                  f"{checked - began:.3f} | {time.perf_counter() - checked:.1f}", flush=True)


if __name__ == "__main__":
    {"attacks": attacks, "honest": honest}[sys.argv[1] if len(sys.argv) > 1 else "attacks"]()
