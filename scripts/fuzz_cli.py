"""Fuzz the real CLI with hostile input: mutated recipes through `hssl pretrain RECIPE --check` and
corrupted checkpoints through `hssl collapse-report` (model files) and `hssl pretrain --resume` is left to
tests/test_fuzz.py. Every case must end in exit code 0 (accepted) or 2 (one clear error line): exit 3 (an
unexpected exception), a traceback in the output or a case over --timeout seconds is a failure.

    python scripts/fuzz_cli.py --recipes 1000 --checkpoints 1000
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from typer.testing import CliRunner  # noqa: E402

from hssl_cli.cli import app  # noqa: E402
from tests.fuzzing import corrupted_checkpoint, mutated_recipe  # noqa: E402


class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang


def run(arguments: list[str], timeout: int) -> tuple[str, str]:
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(timeout)
    try:
        result = CliRunner().invoke(app, arguments)
    except Hang:
        return "hang", ""
    finally:
        signal.alarm(0)
    if isinstance(result.exception, Hang):
        return "hang", ""
    text = result.output
    if "Traceback" in text or result.exit_code not in (0, 2):
        return "traceback", f"exit {result.exit_code}: {text.strip()[-300:]} {result.exception!r}"
    return ("accepted" if result.exit_code == 0 else "clear error"), ""


def source_checkpoint(folder: Path) -> bytes:
    recipe = folder / "fuzz.yaml"
    recipe.write_text("name: fuzz\ndata: {dataset: digits, image_size: 16}\nmodel: {backbone: small_convnet, "
                      "projector: [64, 32]}\ntrain: {epochs: 1, batch_size: 256}\n"
                      "optim: {name: adamw, lr: 0.001, warmup_epochs: 0}\n")
    result = CliRunner().invoke(app, ["pretrain", str(recipe), "--output", str(folder / "runs"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return next((folder / "runs").glob("fuzz/*/last.safetensors")).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", type=int, default=1000)
    parser.add_argument("--checkpoints", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--timeout", type=int, default=60)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    counts = {"recipes": collections.Counter(), "checkpoints": collections.Counter()}
    failures = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        for index in range(args.recipes):
            text, overrides = mutated_recipe(rng)
            path = folder / f"recipe{index}.yaml"
            path.write_bytes(text.encode("utf-8", "surrogatepass") if rng.random() < 0.9 else
                             bytes(rng.randrange(256) for _ in range(rng.randrange(200))))
            outcome, detail = run(["pretrain", str(path), "--check", *[a for o in overrides for a in ("--set", o)]],
                                  args.timeout)
            counts["recipes"][outcome] += 1
            if detail or outcome == "hang":
                failures.append(f"recipe {index}: {outcome} {detail}")
        source = source_checkpoint(folder)
        for index in range(args.checkpoints):
            path = folder / f"case{index}.safetensors"
            what = corrupted_checkpoint(rng, source, path)
            outcome, detail = run(["collapse-report", str(path), "--samples", "16", "--device", "cpu", "--json"],
                                  args.timeout)
            counts["checkpoints"][outcome] += 1
            if detail or outcome == "hang":
                failures.append(f"checkpoint {index} ({what}): {outcome} {detail}")
    for name, counter in counts.items():
        print(f"{name}: " + ", ".join(f"{key} {counter[key]}" for key in
                                      ("clear error", "accepted", "traceback", "hang")))
    print(f"{time.perf_counter() - started:.0f} s")
    for failure in failures[:20]:
        print(failure)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
