# Quick start: `make demo` (the main job) and `make test` (the tests).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.feddp-installed

.PHONY: demo test lint bench fuzz clean

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m napari_feddp.demo

# pytest-xvfb starts a virtual X server: the napari canvas needs OpenGL, which
# Qt's offscreen platform does not provide.
# Lint first (ruff, configured in pyproject.toml), then the full suite.
# Inner loop: make test PYTEST_ARGS='-m "not slow"' skips real Flower processes and training runs.
test: $(STAMP) lint
	$(PY) -m pytest -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[benchmarks]"
	$(PY) benchmarks/open_slide.py

# Structured mutations of the sample slides; each must end in a clear SlideError or a valid
# read, within its time bound. Prints cases tried and failures (exit status 1 on any failure).
FUZZ_CASES ?= 2000
FUZZ_SEED ?= 0
fuzz: $(STAMP)
	$(PY) scripts/fuzz_slides.py --cases $(FUZZ_CASES) --seed $(FUZZ_SEED)
	FUZZ_CHECKPOINT_CASES=$(FUZZ_CASES) $(PY) -m pytest -q -p no:cacheprovider tests/models/test_fuzz_checkpoints.py

clean:
	rm -rf $(VENV) build dist demo-output .pytest_cache
