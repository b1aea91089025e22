"""Privacy evaluation: gradient inversion attacks against FedAvg and HyperFL.

- :mod:`.metrics`: PSNR, SSIM, best matching of reconstructions to ground truth;
- :mod:`.attacks`: the client's upload as a differentiable function
  (:func:`~.attacks.local_update`) and the IG / DLG optimisers (:func:`~.attacks.reconstruct`);
- :mod:`.threats`: what the server observes and knows for FedAvg and for
  HyperFL attack variants a (unknown private parts), b (white-box) and
  c (structure-aware);
- :mod:`.analytic`: the attacks that read HyperFL's upload in closed form first, ``joint`` (an honest server)
  and ``imprint`` (a malicious one), also on the sum of several uploads (secure aggregation).

The command line is ``python -m hyperfl_fast.attack``.
"""
from .attacks import AttackBudget, LocalTraining, reconstruct
from .metrics import match_to_ground_truth, psnr, ssim
from .threats import cnn_scenario, fedavg_scenario, hyperfl_scenario

__all__ = ["AttackBudget", "LocalTraining", "cnn_scenario", "fedavg_scenario", "hyperfl_scenario",
           "match_to_ground_truth", "psnr", "reconstruct", "ssim"]
