"""Which path each op runs: one dispatch for every op, measured on the user's GPU.

Every op has three paths with the same semantics: ``"reference"`` (a readable per-client loop, the oracle),
``"torch"`` (vectorised PyTorch: cuDNN, cuBLAS, or the CPU) and ``"triton"`` (this package's kernels).  An op
call resolves its path in this order:

1. the call's ``path`` argument;
2. an override: :func:`set_overrides` (``--ops-path``) or the environment variable ``HYPERFL_OPS_PATH``,
   either one path for every op (``triton``) or per op (``conv=triton,linear=torch``; an op's short name is
   its name without ``batched_``);
3. on the CPU: ``"torch"``;
4. on CUDA, in ``static`` mode: the op's entry in :data:`STATIC_CUDA` (what a GPU benchmark measured);
5. on CUDA, in ``measured`` mode (the default): the first call with a given key (op, argument shapes and dtypes,
   integer arguments, precision) times the torch and Triton paths on its own input (or, for an op with
   ``measure_on``, on random inputs of the same shapes) with CUDA events (:class:`CudaTimer`; cuDNN's autotuner on,
   Triton autotuned), checks each against the reference path on that input (outputs and, for differentiable calls,
   every input gradient) within the precision's tolerance, and keeps the fastest correct one. When both are
   rejected the reference path runs, with a warning naming the op and the reasons. Choices are cached on disk per
   GPU (name, SM count, driver, torch and Triton versions; :func:`cache_path`), so a later process measures
   nothing. A call made while a CUDA graph is being captured never measures: it takes the static entry.

:func:`stats` counts each op's calls per path and keeps the measured times, for the log line and
``metrics.json``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import statistics
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import precision as _precision

PATHS = ("reference", "torch", "triton")
MODES = ("measured", "static")
ENV_VAR = "HYPERFL_OPS_PATH"
MODE_ENV = "HYPERFL_DISPATCH"
CACHE_ENV = "HYPERFL_DISPATCH_CACHE"
# relative error (max |a - b| / max |reference|) a candidate may have, per precision mode
TOLERANCE = {"fp32": 1e-4, "tf32": 2e-2}

# Static CUDA table: the path measured fastest on a GPU, used with --dispatch static and whenever a call cannot be
# measured.  Figures: one H200, torch 2.11, triton 3.6, 2026-11-30 (benchmarks/RESULTS.md); "unmeasured" entries
# replace a chain of torch launches by one or two and were not timed alone.
STATIC_CUDA = {
    "generate_weights/shared": "torch",  # one cuBLAS GEMM, 0.123 ms; Triton 0.360 ms
    "generate_weights/per-client": "triton",  # 0.500 ms (62% of copy bandwidth); torch 0.711 ms
    "fused_head_sgd_step": "triton",  # 93% of copy bandwidth; torch 41%
    "batched_conv2d_leaky_pool": "triton",  # CNN stack fwd+bwd fp32: fmnist 3.07 vs 4.67 ms, cifar 4.90 vs 5.04
    "batched_linear": "torch",  # cuBLAS
    "batched_classifier_loss": "triton",  # one launch each way instead of about eight (unmeasured)
    "classifier_sgd_step": "triton",  # one launch instead of about twenty (unmeasured)
    "factored_generate": "torch",  # full span: 0.353 ms; Triton 0.439 ms
    "factored_rmatvec": "torch",  # full span: 0.301 ms; Triton 1.013 ms (16% of copy bandwidth)
    "hypernet_client_update": "triton",  # one launch instead of about forty (unmeasured)
    "hypernet_heads_update": "triton",  # one launch instead of six (unmeasured)
}


@dataclass
class Op:
    """An op's three implementations (same signature) and what the dispatcher must know about it."""

    name: str
    reference: Callable
    torch: Callable
    triton: Callable
    mutates: tuple[int, ...] = ()  # positions of tensor arguments it updates in place (its outputs)
    short: str = ""  # the name in overrides and log lines (default: the name)
    # the call a measurement times instead of the first one seen (e.g. the factored heads at their full span,
    # not at the empty span of a round's first step); a key then ignores what this changes
    measure_as: Callable[[tuple], tuple] | None = None
    # the inputs the correctness check and the timing use instead of the call's own (same shapes and flags), where
    # the call's own make the check ill-posed: max-pool ties on real images route gradients by rounding
    measure_on: Callable[[tuple], tuple] | None = None

    def implementation(self, path: str) -> Callable:
        return getattr(self, path)

    @property
    def arg_names(self) -> list[str]:
        return list(inspect.signature(self.reference).parameters)

    def __post_init__(self):
        self.short = self.short or self.name


class Timer:
    """Seconds one call of ``fn`` takes (``label`` names the candidate path)."""

    def __call__(self, label: str, fn: Callable[[], None]) -> float:
        raise NotImplementedError


class CudaTimer(Timer):
    """Median of ``repeats`` calls timed with CUDA events, after ``warmup`` calls (autotuning happens there)."""

    def __init__(self, warmup: int = 2, repeats: int = 7):
        self.warmup, self.repeats = warmup, repeats

    def __call__(self, label, fn):
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


@dataclass
class Choice:
    path: str
    seconds: dict[str, float] = field(default_factory=dict)  # measured candidates
    rejected: dict[str, str] = field(default_factory=dict)  # candidate -> why (wrong result or an error)


class Dispatcher:
    """The resolution rule above, with the measured choices and the per-op call counts."""

    def __init__(self):
        self.ops: dict[str, Op] = {}
        self.mode: str | None = None  # None: $HYPERFL_DISPATCH, else measured
        self.overrides: dict[str, str] | None = None  # None: $HYPERFL_OPS_PATH
        self.timer: Timer = CudaTimer()
        self.cache_dir: Path | None = None
        self.choices: dict[str, Choice] = {}
        self.calls: dict[str, Counter] = {}
        self._loaded_for: tuple[Path, str] | None = None  # (cache file, device description) of self.choices
        self._cache_files: dict[torch.device, tuple[Path, str]] = {}
        self._fast: dict[tuple, str] = {}  # fast_key -> path, for the choices this process has used
        self._parsed_env: dict[str, dict[str, str]] = {}
        # the devices the static table and the measurements are for (tests widen it to the CPU)
        self.accelerated: Callable[[torch.device], bool] = lambda device: device.type == "cuda"

    # ------------------------------------------------------------------ configuration
    def register(self, op: Op) -> Op:
        self.ops[op.name] = op
        return op

    def set_mode(self, mode: str | None) -> None:
        """``measured`` or ``static``; None goes back to ``$HYPERFL_DISPATCH`` (default measured)."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"dispatch mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode

    def set_overrides(self, spec: str | None) -> None:
        """``"triton"`` for every op, ``"conv=triton,linear=torch"`` per op; None goes back to ``$HYPERFL_OPS_PATH``."""
        self.overrides = None if spec is None else parse_overrides(spec, self.ops, "--ops-path")

    def current_mode(self) -> str:
        mode = self.mode or os.environ.get(MODE_ENV) or "measured"
        if mode not in MODES:
            raise ValueError(f"{MODE_ENV} must be one of {', '.join(MODES)}, got {mode!r}")
        return mode

    def current_overrides(self) -> dict[str, str]:
        if self.overrides is not None:
            return self.overrides
        spec = os.environ.get(ENV_VAR) or ""
        if spec not in self._parsed_env:
            self._parsed_env = {spec: parse_overrides(spec, self.ops, ENV_VAR)}
        return self._parsed_env[spec]

    def check_environment(self) -> None:
        """Raise ValueError naming the variable if ``HYPERFL_OPS_PATH`` or ``HYPERFL_DISPATCH`` is malformed."""
        self.current_mode()
        self.current_overrides()

    # ------------------------------------------------------------------ resolution
    def resolve(self, op: Op, path: str | None, args: tuple, static_key: str | None = None,
                check: Callable[[str], None] | None = None) -> str:
        device = _device_of(args)
        overrides = self.current_overrides() if path is None else {}
        chosen = path or overrides.get(op.name) or overrides.get("*")
        if chosen is None:
            if not self.accelerated(device):
                chosen = "torch"
            elif self.current_mode() == "static":
                chosen = STATIC_CUDA.get(static_key or op.name, "torch")
            else:
                chosen = self.measured(op, args, static_key, check)
        if chosen not in PATHS:
            source = "path" if path else ENV_VAR
            raise ValueError(f"{source} must be one of {', '.join(PATHS)}, got {chosen!r}")
        if chosen == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("the triton path needs CUDA tensors (or TRITON_INTERPRET=1 set before importing triton)")
        return chosen

    def call(self, op: Op, path: str | None, args: tuple, static_key: str | None = None,
             check: Callable[[str], None] | None = None):
        """Run ``op`` on ``args`` on its resolved path (``check(path)`` first: the path's own input limits)."""
        chosen = self.resolve(op, path, args, static_key, check)
        if chosen == "triton" and triton_dtype_error(op, args):
            raise ValueError(triton_dtype_error(op, args))
        if check is not None:
            check(chosen)
        self.calls.setdefault(op.name, Counter())[chosen] += 1
        return op.implementation(chosen)(*args)

    def measured(self, op: Op, args: tuple, static_key: str | None,
                 check: Callable[[str], None] | None = None) -> str:
        """The measured choice for this call (measuring it on a miss).  A hit costs a tuple lookup: the key string,
        the device's cache file and the disk are touched only on a miss."""
        if op.measure_as is not None:
            args = op.measure_as(args)
        fast = fast_key(op, args)
        if fast in self._fast:
            return self._fast[fast]
        device = _device_of(args)
        self._load(device)
        key = call_key(op, args)
        if key not in self.choices:
            fallback = STATIC_CUDA.get(static_key or op.name, "torch")
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return fallback  # never time anything inside a graph capture
            self.choices[key] = choice = measure(op, args, self.timer, fallback, check)
            self._save()
            if choice.path == "reference" and {"torch", "triton"} <= choice.rejected.keys():
                warnings.warn(f"dispatch: {op.short} runs its slow reference path at {key.split('|')[1]}: "
                              + "; ".join(f"{p} {why}" for p, why in choice.rejected.items()), RuntimeWarning)
        self._fast[fast] = self.choices[key].path
        return self._fast[fast]

    # ------------------------------------------------------------------ the disk cache
    def _load(self, device: torch.device) -> None:
        if device not in self._cache_files:
            self._cache_files[device] = (cache_path(device, self.cache_dir), device_description(device))
        path, description = self._cache_files[device]
        if self._loaded_for == (path, description):
            return
        self._loaded_for, self.choices, self._fast = (path, description), {}, {}
        try:
            saved = json.loads(path.read_text())
            self.choices = {k: Choice(**v) for k, v in saved["choices"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError):
            warnings.warn(f"ignoring an unreadable dispatch cache {path}; measuring again", RuntimeWarning)

    def _save(self) -> None:
        if self._loaded_for is None:
            return
        path, description = self._loaded_for
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # another process may have measured other calls meanwhile: keep its choices too
                on_disk = json.loads(path.read_text())["choices"]
            except (OSError, ValueError, KeyError, TypeError):
                on_disk = {}
            choices = {**on_disk, **{k: vars(c) for k, c in self.choices.items()}}
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"device": description, "choices": choices}, indent=1))
            tmp.replace(path)
        except OSError as exc:  # a read-only home: the choices still hold for this process
            warnings.warn(f"could not write the dispatch cache {path} ({exc})", RuntimeWarning)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict:
        """Per op: calls per path, and for measured calls the seconds each candidate took."""
        out = {}
        for name, counts in sorted(self.calls.items()):
            measured = {k.split("|", 1)[1]: {"path": c.path, "ms": {p: round(s * 1e3, 4) for p, s in c.seconds.items()},
                                             **({"rejected": c.rejected} if c.rejected else {})}
                        for k, c in self.choices.items() if k.split("|", 1)[0] == name}
            out[name] = {"calls": dict(counts), **({"measured": measured} if measured else {})}
        return out

    def describe(self) -> str:
        """One line: each op's path(s) and calls, with the measured time per call where there is one."""
        parts = []
        for name, entry in self.stats().items():
            paths = "+".join(f"{p} x{n}" for p, n in sorted(entry["calls"].items()))
            times = [m["ms"].get(m["path"]) for m in entry.get("measured", {}).values()]
            times = [t for t in times if t is not None]
            span = "" if not times else f"{min(times):.3g}" if min(times) == max(times) else \
                f"{min(times):.3g}-{max(times):.3g}"
            parts.append(f"{self.ops[name].short} {paths}" + (f" ({span} ms)" if span else ""))
        return ", ".join(parts) if parts else "no op called yet"

    def reset_stats(self) -> None:
        self.calls = {}


def parse_overrides(spec: str | None, ops: dict[str, Op], source: str = "--ops-path") -> dict[str, str]:
    """``"triton"`` -> every op; ``"conv=triton,linear=torch"`` -> per op (short or full names).  Errors name
    ``source`` (the flag or the environment variable the spec came from)."""
    if not spec:
        return {}
    if "=" not in spec:
        if spec not in PATHS:
            raise ValueError(f"{source} must be one of {', '.join(PATHS)}, or op=path pairs such as conv=triton, "
                             f"got {spec!r}")
        return {"*": spec}
    names = {op.short: op.name for op in ops.values()} | {op.name: op.name for op in ops.values()}
    out = {}
    for item in spec.split(","):
        name, _, path = item.strip().partition("=")
        if name not in names:
            raise ValueError(f"{source}: unknown op {name!r}; the ops are "
                             f"{', '.join(sorted(o.short for o in ops.values()))}")
        if path not in PATHS:
            raise ValueError(f"{source}: {name}={path!r}; a path is one of {', '.join(PATHS)}")
        out[names[name]] = path
    return out


def triton_dtype_error(op: Op, args: tuple) -> str | None:
    """Why the Triton path cannot take ``args`` (it computes in float32 only), or None."""
    name, first = next((n, a) for n, a in zip(op.arg_names, args) if isinstance(a, torch.Tensor)
                       and a.is_floating_point())
    return None if first.dtype == torch.float32 else f"{op.name}: the triton path takes float32, {name} is {first.dtype}"


def _device_of(args: tuple) -> torch.device:
    return next(a.device for a in args if isinstance(a, torch.Tensor))


def fast_key(op: Op, args: tuple) -> tuple:
    """:func:`call_key`'s content as a tuple, cheap to build on every call (the device is in it too)."""
    return (op.name, _precision.get_precision(), *(
        (a.shape, a.dtype, a.requires_grad, a.device) if isinstance(a, torch.Tensor) else
        a if isinstance(a, (bool, int, str)) or a is None else None for a in args))


def call_key(op: Op, args: tuple) -> str:
    """What makes two calls the same for timing: shapes, dtypes, whether a gradient is taken (a trailing ``*``),
    integers and strings, and the precision."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}{'*' if a.requires_grad else ''}")
        elif isinstance(a, (bool, int, str)) or a is None:
            parts.append(repr(a))
    return f"{op.name}|{','.join(parts)}|{_precision.get_precision()}"


def device_description(device: torch.device | None = None) -> str:
    """GPU name, SM count, driver, torch and Triton versions: what a cached choice is valid for."""
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return f"cpu|torch {torch.__version__}"
    props = torch.cuda.get_device_properties(device)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return (f"{props.name}|{props.multi_processor_count} SMs|driver {_driver_version()}|cuda {torch.version.cuda}"
            f"|torch {torch.__version__}|triton {triton_version}")


def _driver_version() -> str:
    try:
        import ctypes
        version = ctypes.c_int()
        ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version))
        return str(version.value)
    except (OSError, AttributeError):
        return "unknown"


def cache_path(device: torch.device, cache_dir: Path | None = None) -> Path:
    """The dispatch cache file for ``device`` (``$HYPERFL_DISPATCH_CACHE`` or ``~/.cache/hyperfl_fast``)."""
    folder = cache_dir or Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hyperfl_fast")
    digest = hashlib.sha256(device_description(device).encode()).hexdigest()[:16]
    return Path(folder) / f"dispatch-{digest}.json"


# ---------------------------------------------------------------------------- measuring one call

def random_at(*positions: int) -> Callable[[tuple], tuple]:
    """A ``measure_on`` that replaces the tensors at ``positions`` by standard-normal ones of the same shape, dtype,
    device and ``requires_grad`` (seeded: a measurement is repeatable)."""
    def replace(args: tuple) -> tuple:
        out = list(args)
        for i in positions:
            a = args[i]
            gen = torch.Generator(device=a.device).manual_seed(i)
            out[i] = torch.randn(a.shape, generator=gen, device=a.device, dtype=a.dtype).requires_grad_(a.requires_grad)
        return tuple(out)
    return replace


def _fresh_inputs(op: Op, args: tuple) -> tuple:
    """Copies a candidate may consume: clones of what it mutates, new leaves for what needs a gradient."""
    out = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            if i in op.mutates:
                a = a.detach().clone()
            elif a.requires_grad:
                a = a.detach().clone().requires_grad_()
        out.append(a)
    return tuple(out)


def _candidate(op: Op, path: str, args: tuple) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """(call, results): a closure running ``path`` (forward, and backward if differentiable) on its own copy of
    the inputs, and the results of its first run: outputs (or mutated tensors) and every input gradient."""
    inputs = _fresh_inputs(op, args)
    leaves = [a for a in inputs if isinstance(a, torch.Tensor) and a.requires_grad]
    fn, grads = op.implementation(path), []

    def call() -> list[torch.Tensor]:
        for leaf in leaves:
            leaf.grad = None
        result = fn(*inputs)
        outputs = [inputs[i] for i in op.mutates] if op.mutates else \
            [t for t in (result if isinstance(result, tuple) else (result,)) if isinstance(t, torch.Tensor)]
        differentiable = [o for o in outputs if o.requires_grad]
        if leaves and differentiable:
            if not grads:  # one fixed upstream gradient, the same for every candidate
                gen = torch.Generator(device=differentiable[0].device).manual_seed(0)
                grads.extend(torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)
                             for o in differentiable)
            torch.autograd.backward(differentiable, grads)
            outputs = outputs + [leaf.grad for leaf in leaves]
        return outputs

    return call, [o.detach().clone() if o is not None else None for o in call()]


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Largest max |got - want| / max |want| over the results (inf if one is missing or not finite)."""
    if len(got) != len(want):
        return math.inf
    worst = 0.0
    for g, w in zip(got, want):
        if g is None or w is None or g.shape != w.shape:
            return math.inf
        scale = w.abs().max().item() if w.numel() else 0.0
        diff = (g.double() - w.double()).abs().max().item() if w.numel() else 0.0
        if not math.isfinite(diff):
            return math.inf
        worst = max(worst, diff / max(scale, 1e-30))
    return worst


def measure(op: Op, args: tuple, timer: Timer, fallback: str, check: Callable[[str], None] | None = None) -> Choice:
    """Time the torch and Triton paths on ``args``, keep the fastest whose results match the reference's.  A path
    ``check`` refuses for these inputs, or that fails, is no candidate; if neither is left, the ``fallback``
    (the static table's entry) unless it was refused too, then torch, then the reference.  An op with
    ``measure_on`` is checked and timed on the inputs it returns, not on ``args``."""
    if op.measure_on is not None:
        args = op.measure_on(args)
    _, want = _candidate(op, "reference", args)
    tolerance = TOLERANCE[_precision.get_precision()]
    choice = Choice(fallback)
    for path in ("torch", "triton"):
        if path == "triton" and triton_dtype_error(op, args):
            choice.rejected[path] = "float32 only"
            continue
        try:
            if check is not None:
                check(path)
            call, got = _candidate(op, path, args)
            error = relative_error(got, want)
            if error > tolerance:
                choice.rejected[path] = f"relative error {error:.2e} > {tolerance:.0e}"
                continue
            choice.seconds[path] = timer(path, call)
        except Exception as exc:  # a kernel that cannot compile or launch here is not a candidate
            choice.rejected[path] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    if choice.seconds:
        choice.path = min(choice.seconds, key=choice.seconds.get)
    else:
        choice.path = next(p for p in (fallback, "torch", "reference") if p not in choice.rejected)
    return choice


DISPATCH = Dispatcher()
register = DISPATCH.register
call = DISPATCH.call
