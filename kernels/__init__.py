"""Triton kernels of hyperfl_fast, installed as ``hyperfl_fast.kernels`` (see setup.py's package_dir)."""
