# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing or stale (keyed on pyproject.toml and constraints.txt) with pip, then run.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
KEY := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(KEY)

export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false

BENCH_DATA ?= ../shared/data/mvtec_ad/bottle ../shared/data/magnetic_tile/magnetic_tile ../shared/data/elpv/poly
BENCH_OUT ?= results

.PHONY: install demo test bench bench-ablation stack-up stack-down clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(BIN)/fsad demo

# One BLAS/OpenMP thread per process: the tests run a trainer beside real servers on 2 cores,
# where spinning OpenMP threads were measured 6x slower than one thread.
# The reliability suite runs in a process of its own: its Prefect test harness must not inherit
# event/log workers that earlier in-process flows left pointing at stopped servers.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest --ignore=tests/reliability
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest tests/reliability

# Slow benchmarks (not part of `make test`): pretrained vs default, k = 1 2 4 8, seeds 0 1 2.
bench: $(STAMP)
	$(BIN)/fsad bench --data $(BENCH_DATA) --k 1 2 4 8 --seeds 0 1 2 --methods pretrained default \
		--out $(BENCH_OUT)/bench.json --report $(BENCH_OUT)/bench.md

# The ablation at k = 4: instance, instance+cross, full (pretrained and default come from `bench`).
bench-ablation: $(STAMP)
	$(BIN)/fsad bench --data $(BENCH_DATA) --k 4 --seeds 0 1 2 --methods instance instance+cross full \
		--out $(BENCH_OUT)/ablation.json --report $(BENCH_OUT)/ablation.md

stack-up: $(STAMP)
	$(BIN)/fsad stack up

stack-down: $(STAMP)
	$(BIN)/fsad stack down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
