"""How many images one forward pass of an evaluation may take: as many as its default (512 for features), fewer
where the activations of that many images would not fit a memory budget. A checkpoint trained at 512 px runs
its evaluations a few images at a time instead of asking for 16 GB at once; one image that does not fit is a
one-line error."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from hssl_cli.errors import HsslError

BUDGET_FRACTION = {"cpu": 0.25, "cuda": 0.5}


def memory_budget(device: torch.device) -> tuple[int, str]:
    """(bytes one forward pass may allocate, what that is). On CUDA half of what the device can still give
    (free memory plus what torch's caching allocator holds unused): the model and the data are already there,
    and the other half leaves room for what the measurement does not see (cuDNN's choices at other batch sizes,
    fragmentation). On a CPU a quarter of the memory this process may have (the machine's RAM, or the address
    space left under a limit, `ulimit -v`, where that is less): the decoded split, the features, the Python heap
    and the machine's other processes share the rest, as data.storage auto assumes (data/stream.py). No option
    sets it: it only bounds how many images go through at once, which changes no result beyond float rounding."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(BUDGET_FRACTION["cuda"] * usable), "half of the free memory of the GPU"
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    left = _address_space_left()
    if left is not None and left < memory:
        return int(BUDGET_FRACTION["cpu"] * left), "a quarter of the address space left under ulimit -v"
    return int(BUDGET_FRACTION["cpu"] * memory), "a quarter of this machine's memory"


def _address_space_left() -> int | None:
    """What an address-space limit (ulimit -v, RLIMIT_AS) leaves this process; None without a limit. What is in
    use is read from /proc (Linux, the one system that enforces the limit); importing torch alone takes ~3 GB."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit == resource.RLIM_INFINITY:
        return None
    try:
        with open("/proc/self/statm") as statm:
            in_use = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        in_use = 0
    return max(limit - in_use, 0)


def images_per_pass(forward: Callable[[Tensor], Any], image_shape: tuple[int, ...], device: torch.device,
                    default: int, budget: tuple[int, str] | None = None) -> int:
    """Images per forward pass: budget / the memory `forward` takes for one uint8 image of `image_shape` (C, H, W)
    on `device`, clamped to [1, `default`]. `forward` does what one pass does (normalise, the network, ...);
    it is run once on a black image, so it must draw no randomness it does not own. `budget`: (bytes, what it
    is), memory_budget(device) by default. One image over the budget is an HsslError."""
    budget_bytes, budget_is = budget or memory_budget(device)
    one_image = forward_bytes(forward, torch.zeros((1, *image_shape), dtype=torch.uint8, device=device))
    if one_image > budget_bytes:
        size = "x".join(str(side) for side in image_shape[1:])
        raise HsslError(f"at {size} px one image takes {_shown_bytes(one_image)} in a forward pass of this model, "
                        f"more than the evaluation's memory budget of {_shown_bytes(budget_bytes)} ({budget_is}); "
                        "evaluate on a machine (or --device) with more memory, or train at a smaller data.image_size")
    return max(1, min(default, budget_bytes // max(one_image, 1)))


def _shown_bytes(count: int) -> str:
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.1f} MiB"


def forward_bytes(forward: Callable[[Tensor], Any], batch: Tensor) -> int:
    """The memory `forward(batch)` takes beyond what is already allocated. On CUDA the allocator's peak; on a CPU,
    which keeps no such count, the bytes of every tensor the pass creates (views and in-place results, which
    share their input's memory, left out): what the pass would take if it freed nothing, an upper bound on its
    peak."""
    with torch.no_grad():
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)
            torch.cuda.reset_peak_memory_stats(batch.device)
            before = torch.cuda.memory_allocated(batch.device)
            forward(batch)
            torch.cuda.synchronize(batch.device)
            return torch.cuda.max_memory_allocated(batch.device) - before
        with CreatedTensorBytes() as created:
            forward(batch)
        return created.bytes


class CreatedTensorBytes(TorchFunctionMode):
    """Within `with`: `bytes` adds up the storage of every tensor a torch function returns that shares no memory
    with the function's tensor arguments (so a view, `x.flatten(1)`, or an in-place `relu_` adds nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        inputs = {tensor.untyped_storage().data_ptr() for tensor in _tensors((args, kwargs))}
        for tensor in _tensors(result):
            if tensor.untyped_storage().data_ptr() not in inputs:
                inputs.add(tensor.untyped_storage().data_ptr())
                self.bytes += tensor.untyped_storage().nbytes()
        return result


def _tensors(value: Any) -> Iterator[Tensor]:
    """The tensors in a function's arguments or result (nested tuples, lists and dicts)."""
    if isinstance(value, Tensor):
        if value.layout == torch.strided:  # sparse tensors have no single storage
            yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
