"""One float32 precision policy for every path, set in one place.

- ``"fp32"`` (the default): full float32 products everywhere.  TF32 is
  switched off in cuBLAS and cuDNN (PyTorch turns it on for cuDNN by default),
  so the torch and reference paths are accurate to float32 rounding, and the
  Triton kernels multiply with ``input_precision="ieee"``.
- ``"tf32"``: the fast mode.  cuBLAS, cuDNN and the Triton kernels use TF32
  tensor cores: products of operands rounded to a 10-bit mantissa, summed in
  float32, so results carry relative errors of about 1e-3 (2^-11 per operand
  rounding, growing with the reduction length).  Ampere or newer GPUs only;
  on the CPU nothing changes.

The mode comes from :func:`set_precision`, else the environment variable
``HYPERFL_PRECISION``, else ``"fp32"``; it is applied when
:mod:`hyperfl_fast.ops` is imported.  It changes torch's global TF32 flags
(``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``).
"""
from __future__ import annotations

import os
import warnings

import torch

PRECISIONS = ("fp32", "tf32")
ENV_VAR = "HYPERFL_PRECISION"
TRITON_INPUT_PRECISION = {"fp32": "ieee", "tf32": "tf32"}  # tl.dot's input_precision per mode

_mode = "fp32"


def set_precision(mode: str) -> None:
    """Use ``mode`` (``"fp32"`` or ``"tf32"``) for every op from now on, torch's own GEMMs and convs included."""
    global _mode
    if mode not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {mode!r}")
    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
    torch.backends.cudnn.allow_tf32 = mode == "tf32"
    _mode = mode


def get_precision() -> str:
    """The precision mode in force."""
    return _mode


def triton_input_precision() -> str:
    """What the Triton kernels pass to ``tl.dot`` under the current mode."""
    return TRITON_INPUT_PRECISION[_mode]


def apply_environment() -> None:
    """Set the mode named by ``HYPERFL_PRECISION`` (default fp32); a bad value is a ValueError naming the variable."""
    value = os.environ.get(ENV_VAR, "fp32")
    if value not in PRECISIONS:
        raise ValueError(f"{ENV_VAR} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    set_precision(value)


try:
    apply_environment()  # the policy holds from the first op on
except ValueError as exc:  # a bad variable must not break `import hyperfl_fast`
    warnings.warn(f"{exc}; using fp32", stacklevel=2)
