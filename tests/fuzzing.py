"""Seeded generators of hostile inputs: mutated recipe texts and corrupted checkpoint files. Used by
tests/test_fuzz.py (a few hundred cases) and by scripts/fuzz_cli.py (thousands, through the real CLI)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

RECIPES = sorted(Path(__file__).resolve().parents[1].glob("recipes/*.yaml"))

HOSTILE_VALUES = [
    "1e308", "-1", "0", "1.0e+30", ".inf", "-.inf", ".nan", "1000000000000000000000000000000", "0x10", "0o17",
    "1:30", "true", "yes", "null", "''", "abc", "[]", "{}", "[1e14]", "[0, 0]", "[1, 2, 3]", "~", "'[/x]'",
    "'[link=http://x]y[/link]'", "[/x]", "!!python/object:os.system", "&a [1]", "*a", "\"\\x00\"", "-0.0",
    "1e-320", "99999999999", "'%s%s%s'", "\"é\"", "'a' * 300", "{name: kernel}", "{name: nope}",
    "!!int abc", "!!bool maybe", "!!float [1]", "!!map [1]",
]  # fmt: skip
HOSTILE_LINES = [
    "name: " + "n" * 300, "[/x]: 1", "a: &a [1, 2]\nb: *a", "seed: 1\nseed: 2", "data: {dataset: mnist}",
    "method: {name: hssl}", "model: {backbone: e2_convnet}", "\t- tab", "%YAML 1.1", "--- \n---", "? [a]\n: b",
    "x: " + "[" * 1000 + "]" * 1000, "lol: &l [&k [1, 1], *k]", "!!binary aGVsbG8=", "train: {epochs: 1e22}",
    "optim: {betas: [2, 3]}", "views: [{size: 3}]", "views: [{blur: {p: 2}}]",
    "method: {name: dino, prototypes: 1e14, freeze_last_layer: -1}",
    "views: [{}, {}, {size: 8, count: 64, crop_scale: [0.05, 0.4]}]", "views: [{}, {}, {size: 8}, {size: 12}]",
    "method: {name: byol, predictor: [8], ema: false, equimod: {}}", "method: {name: mocov3, predictor: [1e9]}",
    "method: {name: directpred, loss: iso, ema: false}", "method: {name: simclr, essl: {views: local, head: []}}",
    "model: {backbone: vit, vit: {patch_size: 0, width: 65536, depth: 48, heads: 7}}",
    "model: {backbone: vit, vit: {position_embedding: sinusoidal}}", "method: {name: hssl, fibres_from: block99}",
]  # fmt: skip


def mutated_recipe(rng: random.Random) -> tuple[str, list[str]]:
    """A recipe text (bytes decoded with replacement) and `--set` overrides, mutated 1-3 times."""
    text = rng.choice(RECIPES).read_text()
    overrides: list[str] = []
    for _ in range(rng.randint(1, 3)):
        lines = text.splitlines() or [""]
        where = rng.randrange(len(lines))
        operation = rng.randrange(9)
        if operation == 0:  # a value replaced
            head, sep, _ = lines[where].partition(": ")
            lines[where] = f"{head}: {rng.choice(HOSTILE_VALUES)}" if sep else lines[where]
        elif operation == 1:
            del lines[where]
        elif operation == 2:
            lines.insert(where, lines[where])  # duplicate key
        elif operation == 3:
            lines.insert(where, rng.choice(HOSTILE_LINES))
        elif operation == 4:  # characters flipped
            chars = list(lines[where])
            for _ in range(rng.randint(1, 4)):
                if chars:
                    chars[rng.randrange(len(chars))] = chr(rng.choice([0, 9, 10, 34, 39, 58, 91, 93, 123, 125, 0xFFFD,
                                                                       rng.randrange(32, 0x2FFF)]))
            lines[where] = "".join(chars)
        elif operation == 5:  # a key renamed
            head, sep, tail = lines[where].partition(":")
            lines[where] = f"{head}{rng.choice(['x', 's', '_', '.a', '[/x]'])}{sep}{tail}"
        elif operation == 6:  # indentation broken
            lines[where] = " " * rng.randint(0, 5) + lines[where].lstrip()
        elif operation == 7:
            key = rng.choice(["optim.lr", "seed", "train.epochs", "model.projector", "name", "method.temperature",
                              "data.image_size", "views", "method", "augment.blur.sigma", "x.y", "train", "a..b",
                              "method.prototypes", "method.teacher_temperature", "method.essl", "method.equimod",
                              "views.2.count", "method.ema", "model.vit", "model.vit.patch_size", "model.vit.width",
                              "method.fibres_from"])
            overrides.append(f"{key}={rng.choice(HOSTILE_VALUES)}")
        else:  # truncated
            lines = lines[:where]
        text = "\n".join(lines)
    return text, overrides


def corrupted_checkpoint(rng: random.Random, source: bytes, path: Path) -> str:
    """Write a corrupted copy of the checkpoint bytes `source` to `path`; returns what was done."""
    header_length = struct.unpack("<Q", source[:8])[0]
    header = json.loads(source[8:8 + header_length])
    data = source[8 + header_length:]
    operation = rng.randrange(10)
    if operation == 0:
        cut = rng.randrange(len(source))
        path.write_bytes(source[:cut])
        return f"truncated at {cut}"
    if operation == 1:
        corrupted = bytearray(source)
        for _ in range(rng.randint(1, 8)):
            corrupted[rng.randrange(len(corrupted))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(corrupted))
        return "bits flipped"
    if operation == 2:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64))))
        return "random bytes"
    if operation == 3:  # a huge declared header
        path.write_bytes(struct.pack("<Q", rng.choice([2**40, 2**63, 10**8 + 1])) + source[8:])
        return "header length"
    if operation == 8:  # a header of deeply nested JSON
        nested = ("[" * 100_000 + "]" * 100_000).encode()
        path.write_bytes(struct.pack("<Q", len(nested)) + nested + data)
        return "nested header"
    if operation == 9:  # bytes after the last tensor
        path.write_bytes(source + bytes(rng.randint(1, 4096)))
        return "padded"
    metadata = header.setdefault("__metadata__", {})
    if operation == 4:  # a metadata value replaced
        key = rng.choice(sorted(metadata) + ["format_version", "epoch", "step", "kind"])
        metadata[key] = rng.choice(["abc", "1e3", "-5", "999999999999999", "", "[/x]", "{", "[]", "null", "2",
                                    "training_state", "model", "0", "x" * 2_000_000, "9" * 40,
                                    "{\"0.step\": \"a\"}", "[1, 2]", "name: x\n" * 3])
        what = f"metadata {key}"
    elif operation == 5:  # a metadata key removed
        key = rng.choice(sorted(metadata)) if metadata else "recipe"
        metadata.pop(key, None)
        what = f"no {key}"
    elif operation == 6:  # a tensor's dtype or shape changed (its bytes reinterpreted or cut)
        name = rng.choice([key for key in header if key != "__metadata__"])
        entry = header[name]
        if rng.random() < 0.5:
            entry["dtype"] = rng.choice(["F16", "BF16", "I32", "F64", "U8", "BOOL", "I64"])
        else:
            entry["shape"] = rng.choice([[], [1], [2, 2], [0], list(reversed(entry["shape"]))])
        what = f"tensor {name}"
    else:  # metadata recipe mutated
        text, _ = mutated_recipe(rng)
        metadata["recipe"] = text
        what = "recipe mutated"
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return what
