# The two commands that matter on a fresh machine:
#   make serve   set up, build the default model repository on first use, serve it on :8001
#   make test    set up and run the whole test suite
# Everything runs from ./.venv, created here with pinned versions (constraints.txt).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
REPO   ?= models
STAMP  := $(VENV)/.installed

.PHONY: setup serve test bench proto lint clean

setup: $(STAMP)

# torch goes in first and alone: a bare requirement could otherwise pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	bash loadtest/perf_analyzer.sh --setup-only   # Triton's perf_analyzer for the interop test and benchmarks
	touch $(STAMP)

$(REPO)/.built: | $(STAMP)
	$(BIN)/tensorwire build-default-repo --repo $(REPO)
	touch $@

serve: $(STAMP) $(REPO)/.built
	$(BIN)/tensorwire serve --repo $(REPO) --grpc-port 8001 --metrics-port 8002

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Regenerate BENCHMARKS.md from its named scenarios (~25 min; waits for a quiet machine); ONLY=name[,name]
# measures just those and keeps the others' last numbers. Raw numbers and logs go to .cache/benchmarks/.
ONLY ?=
bench: $(STAMP)
	$(BIN)/python -m tensorwire.loadtest.benchmarks --out BENCHMARKS.md $(if $(ONLY),--only $(ONLY))

proto: $(STAMP)
	$(BIN)/python -m tensorwire.proto.generate

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
