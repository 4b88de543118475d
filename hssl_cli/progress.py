"""How long work reports its progress without drawing anything itself: it is handed a `Progress` (the command
layer passes render.progress_bars) and opens it once per piece of work, e.g. decoding a split."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

# progress(description, total) opens a report of `total` items; it yields advance(count), told of each part done
Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """The Progress that reports nothing: the default of every function taking one."""
    yield lambda count: None
