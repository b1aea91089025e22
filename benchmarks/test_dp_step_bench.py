"""One DP-SGD step per client, three ways side by side (Fashion-MNIST CNN, 20 clients, batch 50):

- ``reference``: the reference engine's step for one client (a backward pass per sample, the authors' way);
- ``lockstep-vmap``: every client at once through per-sample gradients (``dp.per_example_grads``, the oracle);
- ``lockstep-ghost``: every client at once with ghost clipping (``lockstep.dp_step``, what the engine runs).

``trainable`` is what DP-SGD trains: the whole CNN (DP-FedAvg) or the representation without the classifier
(PPSGD and CENTAUR).  Each case includes drawing the noise and the SGD update; ``per_client_ms`` in the extra
info is the median over the clients a call serves.

``test_dp_round`` times a whole (shortened) round of each DP method on both engines: 20 Fashion-MNIST clients of
100 samples, one local epoch, evaluation included; the reference round runs once.
"""
import pytest
import torch

pytest.importorskip("opacus")  # the dp extra (`make test` installs it; a bare GPU image may lack it)

from hyperfl_fast.config import Config
from hyperfl_fast.dp import ClientPrivacy, dp_sgd_step, noised_mean, per_example_grads, clip_and_sum
from hyperfl_fast.lockstep.dp_step import private_step_grads
from hyperfl_fast.lockstep.optim import StackedSGD
from hyperfl_fast.methods import get_method, method_names
from hyperfl_fast.methods.base import sgd
from hyperfl_fast.methods.representation_dp import CLASSIFIER_KEYS
from hyperfl_fast.models import TargetCNN, cnn_spec
from hyperfl_fast.runner import prepare

from conftest import DEVICE, N_CLIENTS, timed

BATCH = 50
TRAINABLE = {"whole-cnn": lambda name: True, "representation": lambda name: name not in CLASSIFIER_KEYS}


def setup(trainable: str):
    torch.manual_seed(0)
    spec, cfg = cnn_spec(1, 10), Config(method="dp-fedavg", device=DEVICE.type)
    models = [TargetCNN(spec).to(DEVICE) for _ in range(N_CLIENTS)]
    names = [name for name, _ in models[0].named_parameters() if TRAINABLE[trainable](name)]
    x = torch.randn(N_CLIENTS, BATCH, 1, 28, 28, device=DEVICE)  # (N, B, C, H, W)
    y = torch.randint(0, 10, (N_CLIENTS, BATCH), device=DEVICE)
    privacy = ClientPrivacy.from_config([600] * N_CLIENTS, cfg)
    return spec, cfg, models, names, x, y, privacy


@pytest.mark.benchmark(group="dp-step")
@pytest.mark.parametrize("trainable", list(TRAINABLE))
@pytest.mark.parametrize("path", ["reference", "lockstep-vmap", "lockstep-ghost"])
def test_dp_step(benchmark, path, trainable):
    spec, cfg, models, names, x, y, privacy = setup(trainable)
    cids = list(range(N_CLIENTS))
    valid = torch.ones(N_CLIENTS, BATCH, dtype=torch.bool, device=DEVICE)
    params = {k: torch.stack([m.state_dict()[k] for m in models]) for k in models[0].state_dict()}  # (N, ...)
    stepper = StackedSGD([params[k] for k in names], cfg.lr, cfg.momentum, cfg.weight_decay)

    if path == "reference":
        model, noise = models[0], privacy.client(0)
        optimizer = sgd([p for n, p in model.named_parameters() if n in names], cfg, cfg.lr)
        step = lambda: dp_sgd_step(model, list(optimizer.param_groups[0]["params"]), optimizer, x[0], y[0],
                                   cfg.dp_clip, noise.sigma, noise.generator(0, 0, 0, DEVICE), None, noise.sample)
        served = 1
    elif path == "lockstep-ghost":
        step = lambda: stepper.step(private_step_grads(spec, params, names, x, y, valid, cfg, privacy, cids, 0, 0, 0),
                                    valid[:, 0])
        served = N_CLIENTS
    else:
        trainable_params = {k: params[k] for k in names}
        frozen = {k: v for k, v in params.items() if k not in names}

        def step():
            per_example = per_example_grads(models[0], trainable_params, torch.nn.functional.cross_entropy, x, y,
                                            clients=True, frozen=frozen)
            clients = [privacy.client(c) for c in cids]
            sums = clip_and_sum(per_example, valid, cfg.dp_clip)
            grads = noised_mean(sums, valid, cfg.dp_clip, [c.sigma for c in clients],
                                [c.generator(0, 0, 0, DEVICE) for c in clients], None, privacy.noise.sample)
            stepper.step(list(grads.values()), valid[:, 0])
        served = N_CLIENTS
    median = timed(benchmark, step, rounds=5, path=path, trainable=trainable, clients_served=served, batch=BATCH)
    benchmark.extra_info["per_client_ms"] = round(1e3 * median / served, 2)


@pytest.mark.benchmark(group="dp-round")
@pytest.mark.parametrize("engine", ["reference", "batched"])
@pytest.mark.parametrize("method", [m for m in method_names() if get_method(m).dp])
def test_dp_round(benchmark, method, engine):
    cfg = Config(method=method, engine=engine, device=DEVICE.type, local_size=100, local_epochs=1)
    federation, _ = prepare(cfg, log=lambda line: None)
    rounds, clients = iter(range(100)), list(range(cfg.clients))
    median = timed(benchmark, lambda: federation.run_round(next(rounds), clients),
                   rounds=1 if engine == "reference" else 3, method=method, engine=engine, clients=cfg.clients)
    benchmark.extra_info["per_client_ms"] = round(1e3 * median / cfg.clients, 1)
