"""Progress bars for long work: tqdm on a terminal, nothing in a log file (which would keep the bar's leftovers)."""
from __future__ import annotations

import sys
from typing import Callable, Iterable


def progress_bar(desc: str, unit: str = "it") -> Callable[[Iterable], Iterable]:
    """A wrapper that shows a transient progress bar over an iterable when stderr is a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, never a requirement
        return iter
    if not sys.stderr.isatty():
        return iter
    return lambda items: tqdm(items, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)
