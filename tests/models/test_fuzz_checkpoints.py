"""Fuzzed checkpoint pairs: every mutation ends in a CheckpointError or a working model, quickly.

Mutations hit the structure a partner could forge: the safetensors header (its length field
and JSON), tensor bytes, truncation, and the card's JSON (keys removed, values of other types
or sizes, deep nesting). Half the cases also rewrite the card's hash so that the checks behind
it (architecture bound, tensor names, shapes, dtypes, finiteness) are reached. The case count
comes from ``FUZZ_CHECKPOINT_CASES`` (``make fuzz`` runs more).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
import time

import torch

from napari_feddp.models import CheckpointError, checkpoint_paths, load_checkpoint, save_checkpoint

CASES = int(os.environ.get("FUZZ_CHECKPOINT_CASES", "300"))
SECONDS_PER_CASE = 2.0
ODD_VALUES = (None, True, -1, 0, 2**63, 1e308, -1e-300, "", "x" * 10_000, [], {}, [1] * 1000, {"a": {"b": {}}},
              "NaN", "unet", "#zzzzzz")


def _mutate_weights(data: bytes, rng: random.Random) -> bytes:
    header_length = struct.unpack("<Q", data[:8])[0]
    kind = rng.choice(("header-bit", "data-bit", "truncate", "length", "header-json", "append"))
    data = bytearray(data)
    if kind == "header-bit":
        position = rng.randrange(8, 8 + header_length)
        data[position] ^= 1 << rng.randrange(8)
    elif kind == "data-bit":
        position = rng.randrange(8 + header_length, len(data))
        data[position] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "length":
        data[:8] = struct.pack("<Q", rng.choice((0, 1, header_length - 1, header_length + 8, 2**40, 2**64 - 1)))
    elif kind == "header-json":
        header = json.loads(bytes(data[8:8 + header_length]))
        name = rng.choice([key for key in header if key != "__metadata__"])
        field = rng.choice(("dtype", "shape", "data_offsets"))
        header[name][field] = rng.choice((["F64"], "F16", "I64", "BOOL", [], [0, 2**40], [-1], [3, 3, 3, 3, 3],
                                          [0, 0], "F32"))
        encoded = json.dumps(header).encode()
        data[:8 + header_length] = struct.pack("<Q", len(encoded)) + encoded
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    return bytes(data)


def _mutate_card(card: dict, rng: random.Random) -> dict:
    kind = rng.choice(("remove", "replace", "replace", "nest"))
    parents = [(card, key) for key in card]
    for value in card.values():
        if isinstance(value, dict):
            parents += [(value, key) for key in value]
            for inner in value.values():
                if isinstance(inner, dict):
                    parents += [(inner, key) for key in inner]
    parent, key = rng.choice(parents)
    if kind == "remove":
        del parent[key]
    elif kind == "replace":
        parent[key] = rng.choice(ODD_VALUES)
    else:
        nested: object = 0
        for _ in range(rng.choice((10, 500, 5_000))):
            nested = [nested]
        parent[key] = nested
    return card


def test_fuzzed_checkpoint_pairs_end_in_a_checkpoint_error_or_a_working_model(tmp_path, tiny_model, tiny_card):
    save_checkpoint(tmp_path / "seed", tiny_model, tiny_card)
    weights0, card0 = (path.read_bytes() for path in checkpoint_paths(tmp_path / "seed"))
    rng = random.Random(0)
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(CASES):
        weights_path, card_path = checkpoint_paths(tmp_path / f"case{case}")
        weights, card = weights0, json.loads(card0)
        if rng.random() < 0.5:
            weights = _mutate_weights(weights, rng)
        else:
            card = _mutate_card(card, rng)
        if rng.random() < 0.5 and isinstance(card, dict):
            card["weights_sha256"] = hashlib.sha256(weights).hexdigest()  # a forger signs its own file
        weights_path.write_bytes(weights)
        try:
            card_path.write_text(json.dumps(card))
        except RecursionError:
            card_path.write_text("[" * 100_000)
        started = time.perf_counter()
        try:
            model, _ = load_checkpoint(weights_path)
        except CheckpointError as exc:
            assert str(weights_path.with_suffix("")) in str(exc), f"case {case}: the file is not named: {exc}"
            outcomes["refused"] += 1
        else:
            with torch.no_grad():
                output = model(torch.rand(1, 3, 32, 32))
            assert torch.isfinite(output).all(), f"case {case}: a loaded model gives non-finite output"
            outcomes["loaded"] += 1
        assert time.perf_counter() - started < SECONDS_PER_CASE, f"case {case} took too long"
        weights_path.unlink()
        card_path.unlink()
    assert outcomes["refused"] > CASES // 2 and outcomes["loaded"] > 0, outcomes  # both ends were reached
