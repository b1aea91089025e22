"""Public API of the fused HyperFL ops, for this package and for other FL code bases.

=====================================  =========================================================
:func:`generate_weights`               embeddings (N, E) -> theta (N, P), shared or per-client hypernetworks
:func:`factored_generate`              theta of per-client hypernetworks with factored heads (W0 + rank one)
:func:`factored_rmatvec`               the transpose product and ‖dθ‖², for the chain rule to the heads' input
:func:`batched_conv2d_leaky_pool`      per-client conv2d + bias -> leaky ReLU -> 2x2 max-pool
:func:`batched_linear`                 per-client linear + bias (-> leaky ReLU)
:func:`batched_classifier_loss`        per-client linear classifier + mean cross-entropy over valid rows
:func:`classifier_sgd_step`            one SGD step of every client's classifier on that loss, in place
:func:`hypernet_client_update`         HyperFL's chain rule to (fc, embedding), clipping and SGD, in place
:func:`hypernet_heads_update`          the factored heads' new slot and the heads' bias SGD step, in place
:func:`fused_head_sgd_step`            clipped SGD step of dense per-client heads without materialising dW
:func:`head_grad_sq_norm`              closed-form squared gradient norm of the heads, per client
=====================================  =========================================================

One module per op holds its validation, its readable per-client reference (the oracle), its vectorised
PyTorch path and its dispatch entry; its Triton kernels sit in :mod:`hyperfl_fast.kernels` under the same
name.  :mod:`.dispatch` picks the path of every call (argument, override, or on CUDA the fastest correct one
measured on the user's GPU); :mod:`.precision` sets one float32 policy for all of them.
"""
from .classifier import batched_classifier_loss, classifier_sgd_step
from .conv import batched_conv2d_leaky_pool
from .dispatch import DISPATCH, ENV_VAR, MODES, PATHS, STATIC_CUDA
from .factored import factored_generate, factored_rmatvec
from .generate import generate_weights
from .head_sgd import fused_head_sgd_step, head_grad_sq_norm
from .hypernet_sgd import hypernet_client_update, hypernet_heads_update
from .linear import batched_linear
from .precision import PRECISIONS, get_precision, set_precision

__all__ = ["DISPATCH", "ENV_VAR", "MODES", "PATHS", "PRECISIONS", "STATIC_CUDA", "batched_classifier_loss",
           "batched_conv2d_leaky_pool", "batched_linear", "classifier_sgd_step", "factored_generate",
           "factored_rmatvec", "fused_head_sgd_step", "generate_weights", "get_precision", "head_grad_sq_norm",
           "hypernet_client_update", "hypernet_heads_update", "set_precision"]
