"""Packaging for hyperfl_fast (metadata, dependencies and extras are in pyproject.toml).

The Triton kernels live in the top-level ``kernels/`` folder of the repository
but are installed as ``hyperfl_fast.kernels``, so no generic top-level
``kernels`` module lands in site-packages.
"""
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["hyperfl_fast", "hyperfl_fast.*"]) + ["hyperfl_fast.kernels"],
    package_dir={"hyperfl_fast": "hyperfl_fast", "hyperfl_fast.kernels": "kernels"},
)
