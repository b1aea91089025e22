"""Run configuration: the paper's defaults (the one place they are written: the training CLI's flags, the Flower
run config and the attack CLI read them from :class:`Config`) and the checks that run before any work starts.

What each method is (its name, whether it is DP, which options it supports) comes from its declaration in
:mod:`hyperfl_fast.methods`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: a Flower ClientApp process that only relays key shares loads no torch
    import torch

ENGINES = ("batched", "reference")
CLIENT_INITS = ("shared", "independent")
PRECISIONS = ("fp32", "tf32")  # as hyperfl_fast.ops.precision
DISPATCH_MODES = ("measured", "static")  # as hyperfl_fast.ops.dispatch
DP_NOISE = ("secure", "keyed")  # as hyperfl_fast.dp
MAX_LR = 10.0  # a larger learning rate is refused as a likely typo (the paper's are 0.02 and 0.1)
DEFAULT_ROUNDS = 20  # fits `make train` (batched engine) on a 2-core CPU; the paper trains 200 rounds


# allowed ranges of the real-valued settings: (low, high, low included, high included)
RANGES = {
    "frac": (0.0, 1.0, False, True),
    "iid_share": (0.0, 1.0, True, True),
    "lr": (0.0, MAX_LR, False, True),
    "classifier_lr": (0.0, MAX_LR, False, True),
    "momentum": (0.0, 1.0, True, False),
    "weight_decay": (0.0, 1.0, True, False),
    "grad_clip": (0.0, math.inf, False, False),
    "epsilon": (0.0, math.inf, False, False),
    "delta": (0.0, 1.0, False, False),
    "dp_clip": (0.0, math.inf, False, False),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class ConfigError(ValueError):
    """An invalid setting; the message names the flag."""


@dataclass
class Config:
    """Every setting of a training run; defaults are the paper's except ``rounds``."""

    dataset: str = "fmnist"
    method: str = "hyperfl"
    engine: str = "batched"  # all clients in lockstep; "reference" trains them one by one
    rounds: int = DEFAULT_ROUNDS
    clients: int = 20
    frac: float = 1.0
    local_epochs: int = 5
    batch_size: int = 50
    lr: float = 0.02  # hypernetwork + embedding (hyperfl), whole model (fedavg, local)
    classifier_lr: float = 0.1  # the non-private classifier steps of hyperfl, ppsgd and centaur
    momentum: float = 0.5
    weight_decay: float = 5e-4
    grad_clip: float = 50.0  # hyperfl: max grad norm, separately for hypernetwork and embedding
    epsilon: float = 4.0  # DP methods: the target privacy budget over the whole run (the authors' setting)
    delta: float = 1e-5
    dp_clip: float = 0.04  # DP methods: per-example gradient norm bound C
    # DP methods: Poisson-sampled DP-SGD batches (each sample joins a step's batch with probability B / n, the
    # noisy sum is divided by the expected batch size), under which the accountant's epsilon holds; False:
    # shuffled batches, as the authors' code (the reported epsilon is then nominal)
    poisson: bool = False
    # DP methods: "secure" noise (a generator per client seeded from the OS at the start of the run: nothing the
    # run writes or sends determines it) or "keyed" (keyed by the seed: reproducible across engines for checks
    # and simulation, never private: anyone who knows the seed removes it)
    dp_noise: str = "secure"
    embed_dim: int = 64
    hidden_dim: int = 128
    # "shared": every client starts from one embedding/classifier (or, for local, one CNN) draw, as the
    # authors' code does by deep-copying one model; "independent": a fresh draw per client (a deviation)
    client_init: str = "shared"
    # hyperfl: each client checks the hypernetwork it receives and refuses one whose weights barely depend on its
    # embedding (hyperfl_fast.methods.psi_check); off by default (see the module: what it does not stop, and why
    # honest clients from the shared start fail it)
    psi_check: bool = False
    iid: bool = False
    iid_share: float = 0.2  # non-IID: share s of each client's samples spread over all classes
    local_size: int | None = None  # training samples per client; None = the dataset's default
    test_size: int | None = None  # test samples per client; None = the dataset's default
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # "tf32": TF32 tensor cores in cuBLAS, cuDNN and the Triton kernels (about 1e-3 relative)
    # hyperfl, batched engine, CUDA: replay each local step from a CUDA graph (hyperfl_fast.lockstep.graphs); off by
    # default until the test suite has passed with it on a GPU
    cuda_graphs: bool = False
    # which path each op takes on CUDA: "measured" (the fastest correct one on this GPU, timed at first use and
    # cached on disk) or "static" (the table in hyperfl_fast.ops.dispatch); on the CPU every op takes torch
    dispatch: str = "measured"
    ops_path: str | None = None  # override: one path for every op ("triton") or per op ("conv=triton,linear=torch")
    # hyperfl-lpm: the frozen pre-trained backbone (hyperfl_fast.backbones.BACKBONES) and a local state dict of
    # its weights (None: random init; nothing is ever downloaded)
    backbone: str | None = None
    backbone_weights: str | None = None
    # local and fedavg on a backbone: "off" trains the head on the fixed backbone (Table 2's dagger), "on" also
    # adapters (double dagger); None = off (hyperfl-lpm's adapters are always there: generated)
    adapters: str | None = None
    data_dir: str = "data"
    output_dir: str | None = None  # None = runs/<dataset>-<method>

    def validate(self) -> "Config":
        """Raise :class:`ConfigError` naming the first bad setting; return self."""
        import torch

        from .methods import CUDA_GRAPHS, METHODS, POISSON, method_names

        if self.method not in METHODS:
            raise ConfigError(f"--method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        method = METHODS[self.method]
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine: unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.client_init not in CLIENT_INITS:
            raise ConfigError(f"--client-init: unknown choice {self.client_init!r}; "
                              f"choose one of {', '.join(CLIENT_INITS)}")
        for name, (low, high, low_closed, high_closed) in RANGES.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or not ((low <= value) if low_closed else (low < value)) \
                    or not ((value <= high) if high_closed else (value < high)):
                interval = f"{'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
                raise ConfigError(f"{_flag(name)} must be a finite number in {interval}, got {value}")
        for name in ("rounds", "clients", "local_epochs", "batch_size", "embed_dim", "hidden_dim",
                     "local_size", "test_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{_flag(name)} must be a positive integer, got {value}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer, got {self.seed}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.dp_noise not in DP_NOISE:
            raise ConfigError(f"--dp-noise must be one of {', '.join(DP_NOISE)}, got {self.dp_noise!r}")
        if self.dispatch not in DISPATCH_MODES:
            raise ConfigError(f"--dispatch must be one of {', '.join(DISPATCH_MODES)}, got {self.dispatch!r}")
        if self.ops_path is not None:
            from .ops.dispatch import DISPATCH, parse_overrides
            try:
                parse_overrides(self.ops_path, DISPATCH.ops, "--ops-path")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        if self.cuda_graphs and (CUDA_GRAPHS not in method.supports or self.engine != "batched"):
            raise ConfigError(f"--cuda-graphs: only {' and '.join(method_names(CUDA_GRAPHS))}'s batched engine "
                              f"captures its steps, not {self.method} on the {self.engine} engine")
        if self.psi_check and not method.checks_received:
            raise ConfigError(f"--psi-check: only {', '.join(n for n, m in METHODS.items() if m.checks_received)} "
                              f"clients check what they receive, not {self.method}")
        self._validate_backbone(method)
        if self.poisson and POISSON not in method.supports:
            raise ConfigError(f"--poisson samples DP-SGD batches: it applies to {', '.join(method_names(POISSON))}, "
                              f"not {self.method}")
        if self.cuda_graphs and self.torch_device().type != "cuda":
            raise ConfigError("--cuda-graphs needs a CUDA device (--device cuda)")
        return self

    def _validate_backbone(self, method) -> None:
        from .backbones import BACKBONES
        from .methods import METHODS

        if self.backbone is not None and self.backbone not in BACKBONES:
            raise ConfigError(f"--backbone: unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if method.needs_backbone and self.backbone is None:
            raise ConfigError(f"--method {self.method} adapts a pre-trained model: give --backbone "
                              f"({' or '.join(BACKBONES)})")
        if self.backbone is not None and not method.runs_on_backbones:
            on_backbones = [n for n, m in METHODS.items() if m.runs_on_backbones]
            raise ConfigError(f"--backbone: {self.method} trains the paper's small CNN; {', '.join(on_backbones)} "
                              "run on a backbone")
        for name in ("backbone_weights", "adapters"):
            if getattr(self, name) is not None and self.backbone is None:
                raise ConfigError(f"{_flag(name)}: give --backbone too")
        if self.adapters not in (None, "on", "off"):
            raise ConfigError(f"--adapters must be on or off, got {self.adapters!r}")
        if method.needs_backbone and self.adapters == "off":
            raise ConfigError(f"--adapters off: {self.method} is generated adapters; for a fixed backbone use "
                              "--method local or fedavg")

    @property
    def with_adapters(self) -> bool:
        """Whether the run's backbone carries adapters (generated by hyperfl-lpm, trained by the baselines)."""
        from .methods import METHODS

        return self.backbone is not None and (self.adapters == "on" or METHODS[self.method].needs_backbone)

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
