"""Packaging for hyperfl_fast.

The Triton kernels live in the top-level ``kernels/`` folder of the repository
but are installed as ``hyperfl_fast.kernels``, so no generic top-level
``kernels`` module lands in site-packages.
"""
from setuptools import setup

setup(
    name="hyperfl_fast",
    version="0.1.0",
    description="Fast, faithful HyperFL (hypernetwork federated learning) with fused Triton kernels",
    packages=["hyperfl_fast", "hyperfl_fast.kernels"],
    package_dir={"hyperfl_fast": "hyperfl_fast", "hyperfl_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={"test": ["pytest", "pytest-benchmark", "matplotlib", "opacus==1.6.0"],
                    "reproduce": ["matplotlib"], "dp": ["opacus==1.6.0"]},
    entry_points={"console_scripts": ["hyperfl-train=hyperfl_fast.train:main",
                                      "hyperfl-reproduce=hyperfl_fast.reproduce:main"]},
)
