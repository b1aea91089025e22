"""Run configuration: the paper's defaults and the checks that run before any work starts."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

METHODS = ("hyperfl", "fedavg", "local")
# The figure the paper reports per method: the mean local accuracy (each client's own trained model on its
# test split) for personalised methods, the global model's accuracy for non-personalised ones (FedAvg).
HEADLINE = {"hyperfl": "local_acc", "fedavg": "global_acc", "local": "local_acc"}
HEADLINE_NAMES = {"local_acc": "mean local accuracy", "global_acc": "global-model accuracy"}
ENGINES = ("batched", "reference")
CLIENT_INITS = ("shared", "independent")
DEFAULT_ROUNDS = 20  # fits `make train` (batched engine) on a 2-core CPU; the paper trains 200 rounds


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
    classifier_lr: float = 0.1  # hyperfl's classifier phase
    momentum: float = 0.5
    weight_decay: float = 5e-4
    grad_clip: float = 50.0  # hyperfl: max grad norm, separately for hypernetwork and embedding
    embed_dim: int = 64
    hidden_dim: int = 128
    # "shared": every client starts from one embedding/classifier (or, for local, one CNN) draw, as the
    # authors' code does by deep-copying one model; "independent": a fresh draw per client (a deviation)
    client_init: str = "shared"
    iid: bool = False
    iid_share: float = 0.2  # non-IID: share s of each client's samples spread over all classes
    local_size: int | None = None  # training samples per client; None = the dataset's default
    test_size: int | None = None  # test samples per client; None = the dataset's default
    seed: int = 0
    device: str = "auto"
    data_dir: str = "data"
    output_dir: str | None = None  # None = runs/<dataset>-<method>

    def validate(self) -> "Config":
        """Raise :class:`ConfigError` naming the first bad setting; return self."""
        if self.method not in METHODS:
            raise ConfigError(f"--method: unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine: unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.client_init not in CLIENT_INITS:
            raise ConfigError(f"--client-init: unknown choice {self.client_init!r}; "
                              f"choose one of {', '.join(CLIENT_INITS)}")
        if not 0.0 < self.frac <= 1.0:
            raise ConfigError(f"--frac must be in (0, 1], got {self.frac}")
        for name in ("rounds", "clients", "local_epochs", "batch_size", "embed_dim", "hidden_dim",
                     "local_size", "test_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
        for name in ("lr", "classifier_lr", "grad_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be non-negative, got {getattr(self, name)}")
        if not 0.0 <= self.iid_share <= 1.0:
            raise ConfigError(f"--iid-share must be in [0, 1], got {self.iid_share}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: no CUDA device is available")
        return self

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
