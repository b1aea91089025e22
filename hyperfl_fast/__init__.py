"""hyperfl_fast: a fast, faithful HyperFL (hypernetwork federated learning).

Public API (reference implementation):

- :class:`~hyperfl_fast.models.HyperNetwork`, :class:`~hyperfl_fast.models.TargetCNN`,
  :func:`~hyperfl_fast.models.cnn_spec`, :func:`~hyperfl_fast.models.split_theta`
- :class:`~hyperfl_fast.config.Config` and :func:`~hyperfl_fast.runner.run`
- the CLI: ``python -m hyperfl_fast.train``
"""
from .config import Config
from .models import CNNSpec, GeneratedCNN, HyperNetwork, TargetCNN, cnn_spec, split_theta
from .runner import run

__all__ = ["CNNSpec", "Config", "GeneratedCNN", "HyperNetwork", "TargetCNN", "cnn_spec", "run", "split_theta"]
__version__ = "0.1.0"
