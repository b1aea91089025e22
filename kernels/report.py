"""What every kernel costs a GPU, without a GPU: ``python -m hyperfl_fast.kernels.report [--json] [--arch 90 80]``.

The workload's own launches are recorded (:func:`.launch.recording`) by running the kernels' launchers on
``meta`` tensors at the real shapes: the Fashion-MNIST and CIFAR models, N = 20 clients, B = 50 samples, the
factored heads at their full span.  Each recorded launch is then compiled ahead of time for each target
(``triton.compile`` with a ``GPUTarget``), once per autotune configuration and per precision, with its
arguments specialised exactly as a real launch specialises them (Triton's own binder).  ``ptxas -v`` (Triton's
bundled copy, through ``knobs.nvidia.dump_ptxas_log``) reports registers, spills and stack; Triton's metadata
the shared memory; ``cuobjdump -sass`` whether tensor-core instructions (HMMA, or HGMMA for wgmma) appear.

A configuration **passes** when it compiles, spills nothing, and fits the architecture's shared memory per
block.  The exit status is 1 if any fails, so ``tests/test_kernel_report.py`` can hold every kernel to that.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import workloads
from .launch import Launch, Tuned, recording

SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes of shared memory one block may use (opt-in maximum)
PRECISIONS = ("ieee", "tf32")


@dataclass
class Row:
    """One compiled configuration of one kernel."""

    arch: int
    workload: str
    kernel: str
    config: str
    registers: int = 0
    spill_bytes: int = 0  # spill stores
    stack_bytes: int = 0
    shared_bytes: int = 0
    warps: int = 0
    tensor_cores: bool = False
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_bytes == 0 and self.shared_bytes <= SHARED_LIMIT[self.arch]


def _variants(item: Launch):
    """(config label, keyword arguments) of each configuration the launch can run with."""
    if isinstance(item.kernel, Tuned):
        for config in item.kernel.configs:
            kw = {**item.kwargs, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
            label = ",".join(f"{k}={v}" for k, v in config.kwargs.items()) + f",w{config.num_warps}"
            yield label, kw
    else:
        yield "fixed", dict(item.kwargs)


def _jit_fn(item: Launch):
    return item.kernel.fn if isinstance(item.kernel, Tuned) else item.kernel


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores")


def compile_one(fn, args, kwargs, arch: int) -> dict:
    """Compile ``fn`` for sm_``arch`` as a launch with ``args``/``kwargs`` would; its resource figures."""
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    key = (fn.__name__, arch, repr(signature), repr(constexprs), repr(attrs), repr(sorted(options.__dict__.items())))
    if key not in _compiled:
        _compiled[key] = _compile(fn, target, signature, constexprs, attrs, options)
    return _compiled[key]


_compiled: dict = {}  # identical specialisations (e.g. one layer shape in two models) compile once


def _compile(fn, target, signature, constexprs, attrs, options) -> dict:
    log = io.StringIO()
    before = triton.knobs.nvidia.dump_ptxas_log, triton.knobs.cache.dir
    # a private cache: Triton skips ptxas (and its log) for kernels it finds in its cache
    triton.knobs.nvidia.dump_ptxas_log, triton.knobs.cache.dir = True, _private_cache()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    finally:
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.cache.dir = before
    text = log.getvalue()
    regs, spill = _PTXAS.search(text), _SPILL.search(text)
    return {"registers": int(regs.group(1)) if regs else 0, "stack_bytes": int(spill.group(1)) if spill else 0,
            "spill_bytes": int(spill.group(2)) if spill else 0, "shared_bytes": compiled.metadata.shared,
            "warps": compiled.metadata.num_warps, "tensor_cores": _uses_tensor_cores(compiled.asm["cubin"])}


_cache_dir: list[tempfile.TemporaryDirectory] = []


def _private_cache() -> str:
    if not _cache_dir:
        _cache_dir.append(tempfile.TemporaryDirectory(prefix="hyperfl-kernel-report-"))
    return _cache_dir[0].name


def _uses_tensor_cores(cubin: bytes) -> bool:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    return bool(re.search(r"\b(HMMA|HGMMA)\b", sass))


def record_workloads(names=None) -> list[tuple[str, str, Launch]]:
    """(workload, precision, launch) of every launch the workloads make, deduplicated by kernel and arguments."""
    seen, out = set(), []
    for name, run in workloads.WORKLOADS.items():
        if names and name not in names:
            continue
        for precision in PRECISIONS:
            with recording() as launches:
                run(precision)
            for item in launches:
                spec = (item.name, tuple(_describe(a) for a in item.args), tuple(sorted(item.kwargs.items())))
                if spec not in seen:
                    seen.add(spec)
                    out.append((name, precision, item))
    return out


def _describe(arg):
    if isinstance(arg, torch.Tensor):
        return (str(arg.dtype), tuple(arg.shape), tuple(arg.stride()))
    return arg


def _tasks(archs, names):
    """(row, compile key, (workload, precision, launch index), keyword arguments) per configuration and arch."""
    tasks = []
    for index, (workload, precision, item) in enumerate(record_workloads(names)):
        fn = _jit_fn(item)
        for label, kw in _variants(item):
            for arch in archs:
                row = Row(arch, workload, item.name, label if "PRECISION" not in kw else f"{label},{precision}")
                tasks.append((row, (arch, _specialisation(fn, item.args, kw, arch)), index, kw))
    return tasks


def _specialisation(fn, args, kwargs, arch) -> str:
    """What Triton compiles differently: two launches with equal strings share one binary."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return f"{fn.__name__}|{signature}|{constexprs}|{attrs}|{sorted(options.__dict__.items())}"


_recorded: dict = {}


def _compile_task(args) -> dict:
    """Worker: compile launch ``index`` of the recorded workloads with ``kw`` for ``arch`` (errors as a dict)."""
    names, index, kw, arch = args
    if names not in _recorded:
        _recorded[names] = record_workloads(names and list(names))
    item = _recorded[names][index][2]
    try:
        return compile_one(_jit_fn(item), item.args, kw, arch)
    except Exception as exc:  # a compile error is a failing row, reported, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}


def report(archs=(90, 80), names=None, workers: int | None = None, progress=None) -> list[Row]:
    """Compile every recorded launch x configuration x architecture (each distinct binary once, in ``workers``
    processes, default one per CPU); one :class:`Row` each."""
    tasks = _tasks(archs, names)
    unique = {}
    for row, key, index, kw in tasks:
        unique.setdefault(key, (tuple(names) if names else None, index, kw, row.arch))
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = dict(zip(unique, pool.map(_compile_task, unique.values(), chunksize=1)))
    else:
        results = {key: _compile_task(job) for key, job in unique.items()}
    rows = []
    for row, key, _, _ in tasks:
        for field, value in results[key].items():
            setattr(row, field, value)
        rows.append(row)
        if progress:
            progress(row)
    if not names:  # every kernel of the package must be in some workload, or its cost goes unreported
        launched = {r.kernel for r in rows}
        rows += [Row(archs[0], "-", name, "-", error="launched by no workload") for name in sorted(package_kernels())
                 if name not in launched]
    return rows


def package_kernels() -> set[str]:
    """The names of every Triton kernel (``*_kernel``) defined in this package's kernel modules."""
    import importlib
    import pkgutil

    names = set()
    for info in pkgutil.iter_modules([os.path.dirname(__file__)]):
        module = importlib.import_module(f"{__package__}.{info.name}")
        for obj in vars(module).values():
            fn = obj.fn if isinstance(obj, Tuned) else obj
            if isinstance(fn, triton.runtime.jit.JITFunction) and fn.__name__.endswith("_kernel"):
                names.add(fn.__name__)
    return names


def markdown(rows: list[Row]) -> str:
    lines = ["| arch | workload | kernel | config | regs | spill B | stack B | shared KB | warps | tensor cores | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| sm_{r.arch} | {r.workload} | {r.kernel} | {r.config} | {r.registers} | {r.spill_bytes} | "
                     f"{r.stack_bytes} | {r.shared_bytes / 1024:.0f} | {r.warps} | {'yes' if r.tensor_cores else 'no'} "
                     f"| {'yes' if r.ok else 'NO ' + r.error} |")
    bad = [r for r in rows if not r.ok]
    lines.append(f"\n{len(rows)} compiled configurations, {len(bad)} failing")
    return "\n".join(lines)


def summary(rows: list[Row]) -> str:
    """One line per architecture and kernel: its configurations' ranges (the table RESULTS.md keeps)."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.arch, r.kernel), []).append(r)
    lines = ["| arch | kernel | compiled | registers | spill B | stack B | shared KB | warps | tensor cores (ieee / tf32) "
             "| all ok |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (arch, kernel), group in sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1])):
        regs = [r.registers for r in group]

        def cores(precision):
            marked = [r.tensor_cores for r in group if r.config.endswith(precision)]
            return "-" if not marked else "yes" if all(marked) else "no" if not any(marked) else "some"
        lines.append(f"| sm_{arch} | {kernel} | {len(group)} | {min(regs)}-{max(regs)} | "
                     f"{max(r.spill_bytes for r in group)} | {max(r.stack_bytes for r in group)} | "
                     f"{max(r.shared_bytes for r in group) / 1024:.0f} | "
                     f"{','.join(str(w) for w in sorted({r.warps for r in group}))} | {cores('ieee')} / {cores('tf32')} "
                     f"| {'yes' if all(r.ok for r in group) else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperfl_fast.kernels.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="one JSON object per compiled configuration")
    parser.add_argument("--summary", action="store_true", help="one line per kernel and architecture")
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SHARED_LIMIT),
                        help="compute capabilities to compile for")
    parser.add_argument("--workload", nargs="+", choices=sorted(workloads.WORKLOADS),
                        help="only these workloads (default: all)")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: one per CPU)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: unset TRITON_INTERPRET: the report compiles for a GPU, the interpreter compiles nothing",
              file=sys.stderr)
        return 2
    print(f"compiling every kernel configuration for sm_{', sm_'.join(map(str, args.arch))} "
          "(a few minutes) ...", file=sys.stderr)
    rows = report(args.arch, args.workload, args.workers)
    if args.json:
        print(json.dumps([{**asdict(r), "ok": r.ok} for r in rows], indent=1))
    else:
        print(summary(rows) if args.summary else markdown(rows))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
