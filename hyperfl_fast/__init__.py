"""hyperfl_fast: a fast, faithful HyperFL (hypernetwork federated learning).

Public API:

- models: :class:`~hyperfl_fast.models.HyperNetwork`, :class:`~hyperfl_fast.models.TargetCNN`,
  :func:`~hyperfl_fast.models.cnn_spec`, :func:`~hyperfl_fast.models.split_theta`;
- fused ops for any FL code base: :mod:`hyperfl_fast.ops` (``generate_weights``,
  ``fused_head_sgd_step``, ``batched_conv2d_leaky_pool``, ``batched_linear``), Triton
  kernels in :mod:`hyperfl_fast.kernels`;
- training: :class:`~hyperfl_fast.config.Config` and :func:`~hyperfl_fast.runner.run`
  (engines: :mod:`hyperfl_fast.batched`, :mod:`hyperfl_fast.reference`);
- privacy evaluation: :mod:`hyperfl_fast.privacy`;
- command lines: ``python -m hyperfl_fast.train`` and ``python -m hyperfl_fast.attack``.
"""
from .config import Config
from .models import CNNSpec, GeneratedCNN, HyperNetwork, TargetCNN, cnn_spec, split_theta
from .runner import run

__all__ = ["CNNSpec", "Config", "GeneratedCNN", "HyperNetwork", "TargetCNN", "cnn_spec", "run", "split_theta"]
__version__ = "0.1.0"
