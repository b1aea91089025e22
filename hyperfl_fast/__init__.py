"""hyperfl_fast: a fast, faithful HyperFL (hypernetwork federated learning).

Public API:

- models: :class:`~hyperfl_fast.models.HyperNetwork`, :class:`~hyperfl_fast.models.TargetCNN`,
  :func:`~hyperfl_fast.models.cnn_spec`, :func:`~hyperfl_fast.models.split_theta`;
- fused ops for any FL code base: :mod:`hyperfl_fast.ops` (``generate_weights``,
  ``batched_conv2d_leaky_pool``, ``batched_linear``, ``batched_classifier_loss``, the factored
  hypernetwork ops, ...; the measured dispatch and the precision policy ``ops.set_precision``),
  Triton kernels in :mod:`hyperfl_fast.kernels`;
- training: :class:`~hyperfl_fast.config.Config` and :func:`~hyperfl_fast.runner.run`
  (methods, one module each: :mod:`hyperfl_fast.methods`; engines: :mod:`hyperfl_fast.engines`,
  :mod:`hyperfl_fast.reference`, :mod:`hyperfl_fast.lockstep`; errors:
  :class:`~hyperfl_fast.config.ConfigError`, :class:`~hyperfl_fast.runner.TrainingDiverged`);
- real federations on Flower: :mod:`hyperfl_fast.flower` (``flwr run .``);
- the paper's Table 1: :func:`~hyperfl_fast.reproduce.reproduce`;
- privacy evaluation: :mod:`hyperfl_fast.privacy`;
- command lines: ``python -m hyperfl_fast.train``, ``python -m hyperfl_fast.reproduce`` and
  ``python -m hyperfl_fast.attack``.
"""
import importlib

# The public API, each name imported from its module on first use, so that importing a submodule (a Flower
# ClientApp process that only relays SecAgg+ key shares) does not load torch.  The float32 policy (TF32 off, see
# hyperfl_fast.ops.precision) takes effect when the first computing module loads.
_EXPORTS = {"Config": "config", "ConfigError": "config", "CNNSpec": "models", "GeneratedCNN": "models",
            "HyperNetwork": "models", "TargetCNN": "models", "cnn_spec": "models", "split_theta": "models",
            "TrainingDiverged": "runner", "run": "runner"}
__all__ = sorted(_EXPORTS, key=str.lower)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
