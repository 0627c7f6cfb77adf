"""Fuzzing the slide opener: structured mutations of the real sample slides (``scripts/fuzz_slides.py``).

Every mutated file must end in a valid result (open, read a region, read the
coarsest level) or a SlideError naming the file, within a time bound, in worker
processes under a 3 GB address-space limit. ``make fuzz`` runs longer.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from scripts.fuzz_slides import SHARED_SLIDES, check_file, derived_seeds, mutate, read_layout, run_fuzz

from .conftest import require_data

#: seconds after which no new case is started (the cases are the same every run; how many fit varies)
BUDGET_SECONDS = 40
CASES = 1500


@pytest.mark.slow
def test_fuzzed_slides_end_in_slide_error_or_a_valid_result():
    if os.environ.get("FEDDP_REQUIRE_DATA") == "1":
        for name in SHARED_SLIDES:
            require_data(f"slides/{name}")
    summary = run_fuzz(cases=CASES, seconds=BUDGET_SECONDS, seed=0, workers=2, case_seconds=30)
    assert not summary["failures"], json.dumps(summary["failures"][:5], indent=1)
    assert summary["cases"] >= 100, summary
    assert summary["outcomes"].get("ok", 0) >= 10 and summary["outcomes"].get("slide-error", 0) >= 10
    assert "CMU-1-Small-Region.svs" in summary["seeds"] and "cmu-subifds.tif" in summary["seeds"]


def test_mutations_are_reproducible_and_hit_the_structure(tmp_path):
    seed_path = derived_seeds(tmp_path)[0]
    original = seed_path.read_bytes()
    layout = read_layout(seed_path)
    assert layout.ifds and layout.tags and layout.data
    first = [mutate(original, layout, random.Random(f"3/{case}")) for case in range(40)]
    again = [mutate(original, layout, random.Random(f"3/{case}")) for case in range(40)]
    assert first == again
    assert len({data for data, _ in first}) >= 35 and sum(data != original for data, _ in first) >= 35
    kinds = {part.split()[0].split("@")[0] for _, description in first for part in description.split("; ")}
    assert {"tag-value", "tag-header", "flip-structure", "truncate"} <= kinds


def test_check_file_reports_what_happened(tmp_path):
    path = tmp_path / "broken.svs"
    path.write_bytes(b"II*\0" + b"\xff" * 100)
    outcome, detail = check_file(str(path))
    assert outcome == "slide-error" and "broken.svs" in detail
    assert check_file(str(derived_seeds(tmp_path)[0]))[0] == "ok"


def test_a_case_over_its_time_bound_is_a_failure_not_a_stuck_suite():
    summary = run_fuzz(cases=2, workers=1, case_seconds=1e-4)  # its worker is killed and replaced
    assert summary["cases"] == 2
    assert [f["outcome"] for f in summary["failures"]] == ["timeout", "timeout"]
