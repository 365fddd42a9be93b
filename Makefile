# Book machinery. `make book` and `make test` need nothing but python3 (they create .venv).
#   make run PROFILE=smoke [CHAPTER=04-attribution]   execute chapters into _freeze/<profile>/
#   make compute PROFILE=smoke GPUS=2 [SET=...]        fill artifacts/ on GPUS processes (torchrun, lib.compute)
#   make run PROFILE=smoke SET="stats.n_bins=20 seeds=[0,1]"
#                                                     "what if": into _freeze/<profile>+<slug>/ (git-ignored)
#   make book [BOOK_PROFILE=...]                      render _book/ from frozen outputs (no execution)
#   make link [BOOK_PROFILE=...]                      point index.ipynb and book/*.ipynb at _freeze/<profile>/
#   make test                                         unit + freshness tests, nbval on _freeze/smoke/
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROFILE ?= smoke
CHAPTER ?=
SET ?=
BOOK_PROFILE ?=
GPUS ?= 1
# Torch must not oversubscribe the 2-core CI machine.
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2
export MPLBACKEND ?= agg
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: venv run compute link book test test-unit test-nbval clean

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e . --no-deps
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m lib.runner run --profile $(PROFILE) $(if $(CHAPTER),--chapter $(CHAPTER)) $(foreach s,$(SET),--set '$(s)')

compute: $(STAMP)
	$(PY) -m torch.distributed.run --standalone --nproc-per-node=$(GPUS) -m lib.compute compute --profile $(PROFILE) $(foreach s,$(SET),--set '$(s)')

link: $(STAMP)
	$(PY) -m lib.runner link $(if $(BOOK_PROFILE),--profile $(BOOK_PROFILE))

book: $(STAMP)
	@if command -v quarto >/dev/null 2>&1; then \
	  $(if $(BOOK_PROFILE),$(PY) -m lib.runner link --profile $(BOOK_PROFILE) &&) \
	  QUARTO_PYTHON=$(PY) quarto render; \
	else \
	  echo "quarto not on PATH: rendering with the offline renderer (python -m lib.render)"; \
	  $(PY) -m lib.render $(if $(BOOK_PROFILE),--profile $(BOOK_PROFILE)); \
	fi

test: test-unit test-nbval

test-unit: $(STAMP)
	$(PY) -m pytest tests/ -q

# nbval re-executes the frozen smoke notebooks (kernel of this venv, cwd = the notebook's folder, so
# chapters must locate files through lib.paths) and, being lax, compares only the outputs of cells
# marked `# NBVAL_CHECK_OUTPUT`, after tests/nbval_sanitize.cfg; the tables the chapters save go to a
# temporary folder (LLA_RESULTS), not over the frozen ones. With no frozen smoke notebook there
# is nothing to run (the freshness test reports that); with notebooks, pytest's exit code 5
# ("no tests collected") means nbval did not collect them and is a failure.
test-nbval: $(STAMP)
	@shopt -s nullglob; nbs=(_freeze/smoke/*.ipynb); \
	if [ $${#nbs[@]} -eq 0 ]; then echo "nbval: no notebooks in _freeze/smoke/, nothing to run"; exit 0; fi; \
	results=$$(mktemp -d); trap 'rm -rf "$$results"' EXIT; \
	LLA_RESULTS=$$results $(PY) -m pytest -q -p no:cacheprovider -o testpaths= --nbval-lax --nbval-current-env \
	  --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout 900 "$${nbs[@]}"

clean:
	rm -rf _book _render _failed
