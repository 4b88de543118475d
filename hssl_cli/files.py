"""Atomic file writes (a reader sees the old file or the new one, never half of one), and where hssl keeps its
caches."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


TEMP_SUFFIX = ".tmp"
DECODED_CACHE_FOLDER = ".hssl-cache"


def default_cache_dir(kind: str = "features") -> Path:
    """$HSSL_CACHE_DIR/<kind>, else $XDG_CACHE_HOME/hssl/<kind>, else ~/.cache/hssl/<kind>: the probe's
    features, the streamed channel statistics."""
    if "HSSL_CACHE_DIR" in os.environ:
        return Path(os.environ["HSSL_CACHE_DIR"]) / kind
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hssl" / kind


def decoded_split_cache_dirs(root: Path) -> list[Path]:
    """Where an image folder's decoded splits are cached, first choice first: beside the images, else the
    shared ~/.cache/hssl (when data.root is not writable)."""
    return [root / DECODED_CACHE_FOLDER, Path.home() / ".cache" / "hssl"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Delete the temp files an interrupted atomic write left in `folder` (`.NAME.XXXX.tmp`); the files
    they were to replace are intact. Call it when a run folder is opened by the one process that owns it."""
    removed = []
    for stale in folder.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()
            removed.append(stale)
    return removed


def write_atomically(path: Path, write_to: Callable[[str], None]) -> None:
    """Call `write_to(temp)` for a temp file in the same folder, fsync it, rename it to `path`, fsync the
    folder; on any failure the temp file goes and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(handle)
    try:
        write_to(temp)
        with open(temp, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp's 0600 would hide checkpoints from a shared group
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def save_safetensors_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file  # imports torch: only checkpoint writers pay for it

    write_atomically(path, lambda temp: save_file(tensors, temp, metadata=metadata))


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda temp: Path(temp).write_text(text))


def save_figure_atomically(figure, path: Path, dpi: int = 130) -> None:
    """A matplotlib Figure to `path`, in the format its suffix names (png, pdf, svg)."""
    write_atomically(path, lambda temp: figure.savefig(temp, dpi=dpi, format=path.suffix.lstrip(".").lower()))
