"""How each method's training step compiles (issue 15): graphs, graph breaks (with their reasons) and whether a
warmed-up step recompiles, on the CPU, for every method variant the tests train (tests/conftest.py's
METHOD_OVERRIDES on the tests' tiny recipe). A recompile at every step, or a break in the middle of the model,
costs a GPU far more than it costs here; this finds them without one.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compile_report.py            # every variant, ~4 min
    .venv/bin/python benchmarks/compile_report.py simclr directpred          # some

Each variant: 2 warm-up steps compiled (model and augmentation, as `train.compile`), then 2 more with
`error_on_recompile`; the first step's loss is compared with the eager step's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' method list, from the repository root
from hssl_cli.data.views import build_pipelines  # noqa: E402
from hssl_cli.engine.optim import build_optimizer  # noqa: E402
from hssl_cli.engine.train import training_step  # noqa: E402
from hssl_cli.methods import build_method  # noqa: E402
from hssl_cli.recipe import parse_recipe  # noqa: E402
from tests.conftest import METHOD_OVERRIDES, TINY_RECIPE  # noqa: E402

WARMUP_STEPS, CHECKED_STEPS, BATCH = 2, 2, 16


def losses_of(recipe, compiled: bool) -> list[float]:
    """Per-step losses of WARMUP_STEPS + CHECKED_STEPS steps from one seed; compiled steps after the warm-up
    raise on a recompile."""
    mean, std = torch.tensor([0.4]), torch.tensor([0.3])
    images = torch.randint(0, 256, (BATCH, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    method = build_method(recipe, in_channels=1).train()
    optimizer = build_optimizer(method, recipe.optim)
    pipelines = build_pipelines(recipe, mean, std)
    if compiled:
        for pipeline in pipelines:
            pipeline.augmenter.compile()
    forward = torch.compile(method) if compiled else method
    generator = torch.Generator().manual_seed(0)
    losses = []
    total = WARMUP_STEPS + CHECKED_STEPS
    for step in range(total):
        with torch._dynamo.config.patch(error_on_recompile=compiled and step >= WARMUP_STEPS):
            out = training_step(forward, optimizer, pipelines, recipe.method.consumes.original, mean, std, images,
                                generator, 1e-3, False)
        losses.append(float(out["loss"].detach()))
        method.after_optimizer_step((step + 1) / total)
    return losses


def report(case: str) -> dict:
    from torch._dynamo.utils import counters

    recipe = parse_recipe(TINY_RECIPE, "tiny.yaml", overrides=[*METHOD_OVERRIDES[case], f"train.batch_size={BATCH}"])
    torch._dynamo.reset()
    counters.clear()
    start = time.perf_counter()
    row = {"case": case}
    try:
        eager, compiled = losses_of(recipe, False), losses_of(recipe, True)
        row["recompiles"] = "none"
        row["first_loss_difference"] = abs(eager[0] - compiled[0])
    except torch._dynamo.exc.RecompileError as error:
        row["recompiles"] = "yes: " + str(error).splitlines()[0][:80]
    row["graphs"] = counters["stats"]["unique_graphs"]
    row["breaks"] = sum(counters["graph_break"].values())
    row["reasons"] = sorted({reason.splitlines()[0][:70] for reason in counters["graph_break"]})
    row["seconds"] = time.perf_counter() - start
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases", nargs="*",
                        help=f"method variants (default: all): {', '.join(sorted(METHOD_OVERRIDES))}")
    cases = parser.parse_args().cases or sorted(METHOD_OVERRIDES)
    unknown = sorted(set(cases) - METHOD_OVERRIDES.keys())
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(sorted(METHOD_OVERRIDES))}")
    table = Table(title=f"torch.compile of each method's training step (CPU, batch {BATCH}, {WARMUP_STEPS} warm-up + "
                  f"{CHECKED_STEPS} checked steps)")
    for column in ("method", "recompiles after warm-up", "graphs", "graph breaks", "first-step |loss - eager|",
                   "break reasons", "s"):
        table.add_column(column)
    for case in cases:
        row = report(case)
        difference = row.get("first_loss_difference")
        table.add_row(case, row["recompiles"], str(row["graphs"]), str(row["breaks"]),
                      "-" if difference is None else f"{difference:.1e}", "; ".join(row["reasons"]) or "-",
                      f"{row['seconds']:.0f}")
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
