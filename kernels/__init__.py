"""Triton kernels of hyperfl_fast, installed as ``hyperfl_fast.kernels`` (see setup.py's package_dir).

One module per op, each holding its kernels, launcher and ``torch.autograd.Function``:
``generate`` (hypernetwork weight generation), ``head_sgd`` (fused clipped SGD step
of the per-client heads), ``conv`` (batched conv + leaky ReLU + max-pool) and
``linear`` (batched linear), plus the shared ``bmm`` kernel.  Use them through
:mod:`hyperfl_fast.ops`, which validates inputs and picks the path.
"""
