"""CUDA-graph capture of a lockstep engine's local steps (``--cuda-graphs``, off by default).

A lockstep step is a few dozen kernel launches for all clients at once; on a GPU their launch cost, not their
arithmetic, bounds a round.  A :class:`StepGraph` runs a step function on *static* batch buffers: each call
copies the batch in, and from the third call on (two eager warm-up steps, so cuBLAS/cuDNN handles, Triton
autotuning and the ops' measured dispatch run outside capture) replays one recorded CUDA graph instead of
launching the step's kernels one by one.  Steps must therefore keep fixed shapes and update their state in
place (the engine's persistent buffers, :class:`hyperfl_fast.methods.hyperfl.RoundBuffers`); the recorded graph
reads and writes the same tensors on every replay, so one capture serves every round of the process.  A batch
of another shape (a round whose sampled clients have fewer samples) warms up and records again.

``limit`` bounds the calls between two :meth:`new_round` calls (a replayed step advances device-side
counters that the host no longer sees, such as the heads' slot, so the bound is kept here).

Without ``capture`` (on the CPU) the step runs eagerly on the same static buffers, which is how the CPU
tests check the static-shape step against the reference engine.  If capture fails (a CUDA error, or a Triton
kernel that cannot compile or launch on this GPU) the step warns once and runs eagerly.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

from .data import Batch

try:
    from triton.runtime.errors import TritonError  # OutOfResources, PTXASError, CompilationError
    CAPTURE_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, TritonError)
except ImportError:  # pragma: no cover - triton ships with torch's CUDA builds
    CAPTURE_ERRORS = (RuntimeError,)

WARMUP_STEPS = 2  # eager steps before capture (on a side stream, as torch.cuda.graph asks)
BATCH_FIELDS = [f.name for f in dataclasses.fields(Batch)]


class StepGraph:
    """``step(batch)`` on static copies of the batches; captured into a CUDA graph with ``capture``."""

    def __init__(self, step: Callable[[Batch], None], capture: bool, limit: int | None = None):
        self.step, self.capture, self.limit = step, capture, limit
        self.static: Batch | None = None  # the buffers the step (and the graph) reads
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0  # since the static buffers were made
        self.round_calls = 0  # since new_round()
        self.captures = 0

    def new_round(self) -> None:
        self.round_calls = 0

    def __call__(self, batch: Batch) -> None:
        if self.limit is not None and self.round_calls >= self.limit:
            raise RuntimeError(f"StepGraph: step {self.round_calls + 1} of a round that holds {self.limit}")
        self.round_calls += 1
        if self.static is None:
            self.static = Batch(*(getattr(batch, f).clone() for f in BATCH_FIELDS))
        elif any(getattr(self.static, f).shape != getattr(batch, f).shape for f in BATCH_FIELDS):
            self.static = Batch(*(getattr(batch, f).clone() for f in BATCH_FIELDS))  # warm up, record again
            self.graph, self.calls = None, 0
        else:
            for f in BATCH_FIELDS:
                getattr(self.static, f).copy_(getattr(batch, f))
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and self.calls > WARMUP_STEPS:
            self._capture_and_run()
        elif self.capture:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.step(self.static)
            torch.cuda.current_stream().wait_stream(side)
        else:
            self.step(self.static)

    def _capture_and_run(self) -> None:
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.step(self.static)  # recorded, not run
        except CAPTURE_ERRORS as exc:
            warnings.warn(f"--cuda-graphs: capture failed ({str(exc).splitlines()[0][:160]}); "
                          "running the steps eagerly", RuntimeWarning, stacklevel=3)
            self.capture = False
            self.step(self.static)
            return
        self.graph = graph
        self.captures += 1
        graph.replay()
