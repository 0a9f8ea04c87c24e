# The two commands that matter on a fresh machine:
#   make serve   set up, build the default model repository on first use, serve it
#   make test    set up and run the whole test suite
# Everything runs from ./.venv, created here with pinned versions (constraints.txt).
#
# make serve takes: REPO (models), HOST (0.0.0.0: every interface, no auth; 127.0.0.1 for this
# machine only), GRPC_PORT (8001), HTTP_PORT (8000; 0 disables), METRICS_PORT (8002; 0 disables), e.g.
#   make serve HOST=127.0.0.1 GRPC_PORT=9001 HTTP_PORT=9000 METRICS_PORT=9002

PYTHON       ?= python3
VENV         := .venv
BIN          := $(VENV)/bin
REPO         ?= models
HOST         ?= 0.0.0.0
GRPC_PORT    ?= 8001
HTTP_PORT    ?= 8000
METRICS_PORT ?= 8002
STAMP        := $(VENV)/.installed
PIP          := $(BIN)/python -m pip --disable-pip-version-check

# $(call retry,COMMAND): up to 3 attempts, 15 s then 30 s apart, so that a registry hiccup does not end
# the set-up. (apt steps live in loadtest/perf_analyzer.sh, which also retries on a held dpkg lock.)
retry = for attempt in 1 2 3; do $(1) && break; [ $$attempt -lt 3 ] || exit 1; \
	echo "setup: attempt $$attempt of 3 failed; retrying in $$((attempt * 15)) s" >&2; sleep $$((attempt * 15)); done

.PHONY: setup serve test perf-analyzer bench proto lint clean

setup: $(STAMP)

# torch goes in first and alone: a bare requirement could otherwise pull a multi-GB CUDA build.
# pip runs without -q, so every package shows as it is collected and installed (a few minutes in all).
$(STAMP): pyproject.toml constraints.txt
	@echo "setup 1/3: virtual environment $(VENV) and pip"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(call retry,$(PIP) install -q --upgrade pip)
	@echo "setup 2/3: torch (CPU build, about 200 MB)"
	@$(call retry,$(PIP) install -c constraints.txt torch)
	@echo "setup 3/3: tensorwire and its dependencies (editable, with the dev extra)"
	@$(call retry,$(PIP) install -c constraints.txt -e '.[dev]')
	touch $(STAMP)
	@echo "setup: done (perf_analyzer, for one interop test and the benchmarks: make perf-analyzer)"

# The default digits models are trained and published on first use (about 20 s); a model that
# misses its accuracy gate is reported in one line and the others are served.
serve: $(STAMP)
	$(BIN)/tensorwire build-default-repo --repo $(REPO)
	$(BIN)/tensorwire serve --repo $(REPO) --host $(HOST) --grpc-port $(GRPC_PORT) --http-port $(HTTP_PORT) --metrics-port $(METRICS_PORT)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Optional: Triton's perf_analyzer (for tests/test_perf_analyzer.py, tests/test_pa_sweep.py and make bench).
# Those tests set it up themselves when they can and skip, saying why, when they cannot.
perf-analyzer: $(STAMP)
	bash loadtest/perf_analyzer.sh --setup-only

# Regenerate BENCHMARKS.md from its named scenarios (~45 min; waits for a quiet machine); ONLY=name[,name]
# measures just those and keeps the others' last numbers. Raw numbers and logs go to .cache/benchmarks/.
ONLY ?=
bench: $(STAMP) perf-analyzer
	$(BIN)/python -m tensorwire.loadtest.benchmarks --out BENCHMARKS.md $(if $(ONLY),--only $(ONLY))

proto: $(STAMP)
	$(BIN)/python -m tensorwire.proto.generate

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
