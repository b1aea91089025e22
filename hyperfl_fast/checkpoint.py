"""Run files: checkpoints with an integrity check, strict-JSON metrics, and the output folder's checks.

A checkpoint holds the run's config, the engine's state and every finished
round's figures, plus a SHA-256 digest of all of it.  It is written to
``checkpoint.tmp`` and renamed over ``checkpoint.pt``, so a kill during the
write leaves the previous checkpoint whole; loading verifies the digest, so a
damaged file is refused with one line naming it instead of resuming into
garbage.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Callable

import torch

from .config import ConfigError


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def _feed(digest, obj) -> None:
    """Feed ``obj`` (nested dicts, lists, tensors, numbers, strings) into ``digest`` in a fixed order."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        digest.update(f"tensor {t.dtype} {tuple(obj.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(obj, dict):
        digest.update(f"dict {len(obj)}".encode())
        for key in sorted(obj, key=str):
            _feed(digest, key)
            _feed(digest, obj[key])
    elif isinstance(obj, (list, tuple)):
        digest.update(f"list {len(obj)}".encode())
        for item in obj:
            _feed(digest, item)
    else:
        digest.update(f"{type(obj).__name__} {obj!r}".encode())


def state_digest(state: dict) -> str:
    """SHA-256 of a checkpoint's contents (everything but the digest itself)."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != "sha256"})
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` with its digest, atomically (temporary file, then rename)."""
    tmp = path.with_suffix(".tmp")
    torch.save({**state, "sha256": state_digest(state)}, tmp)
    os.replace(tmp, path)


def host_copy(obj):
    """``obj`` (nested dicts, lists, tensors) with every tensor copied to host memory: a snapshot that later
    in-place updates of the originals cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(host_copy(v) for v in obj)
    return obj


class BackgroundWriter:
    """Writes a round's checkpoint (and whatever follows it, e.g. the metrics) on a thread while the next round
    trains.  One write is in flight at a time: :meth:`submit` first waits for the previous one (and re-raises its
    error), and :meth:`close` waits for the last, so a run that stops, or is interrupted, keeps every finished
    round.  The state is snapshotted to host memory before :meth:`submit` returns."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, path: Path, state: dict, then: Callable[[], None] = lambda: None) -> None:
        self.wait()
        snapshot = host_copy(state)

        def write():
            try:
                save_checkpoint(path, snapshot)
                then()
            except BaseException as exc:  # reported by the next submit() or close()
                self._error = exc

        self._thread = threading.Thread(target=write, name="hyperfl-checkpoint", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    close = wait


def load_checkpoint(path: Path, device: torch.device,
                    advice: str = "delete it to start afresh, or pass another --output-dir",
                    required: tuple[str, ...] = ("config", "engine", "rounds")) -> tuple[dict, bool]:
    """Read and verify a checkpoint holding at least the ``required`` keys: (state, verified); verified is False
    for files from before digests.

    Every problem is a :class:`CheckpointError` naming the file and ending in ``advice``.
    """
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # truncated, empty, text, garbage: torch raises many types
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason}); {advice}") from None
    if not isinstance(state, dict) or not set(required) <= state.keys():
        raise CheckpointError(f"{path} is not a hyperfl_fast checkpoint (its contents are not a run's state); {advice}")
    if "sha256" not in state:
        return state, False
    if state_digest(state) != state["sha256"]:
        raise CheckpointError(f"{path} failed its integrity check (checksum mismatch: the file is corrupted); "
                              f"{advice}")
    return state, True


def _finite_or_none(obj):
    """``obj`` with every non-finite float replaced by None, so JSON stays strict."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def write_json(path: Path, obj) -> None:
    """Strict JSON (no NaN or Infinity: those become null), written atomically."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_finite_or_none(obj), indent=2, allow_nan=False))
    os.replace(tmp, path)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    """A CSV file, written atomically."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(tmp, path)


def check_writable(folder: Path, flag: str = "--output-dir") -> None:
    """Create ``folder`` if needed and prove it takes files; else a :class:`ConfigError` naming ``flag``."""
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{flag} {folder}: exists and is not a folder; choose another {flag}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{flag} {folder}: cannot write there ({exc.strerror or exc}); "
                          f"choose another {flag}") from None
