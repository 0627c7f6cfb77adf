# Quick start: `make demo` (the main job) and `make test` (the tests).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.feddp-installed

.PHONY: demo test bench clean

$(STAMP): setup.cfg pyproject.toml requirements/constraints.txt scripts/bootstrap.sh
	bash scripts/bootstrap.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m napari_feddp.demo

# pytest-xvfb starts a virtual X server: the napari canvas needs OpenGL, which
# Qt's offscreen platform does not provide.
test: $(STAMP)
	$(PY) -m pytest -ra $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) -m pip install -q -c requirements/constraints.txt -e ".[benchmarks]"
	$(PY) benchmarks/open_slide.py

clean:
	rm -rf $(VENV) build dist demo-output .pytest_cache
