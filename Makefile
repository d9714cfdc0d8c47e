# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing or stale (keyed on pyproject.toml and constraints.txt) with pip, then run.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
KEY := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
STAMP := $(VENV)/.installed-$(KEY)

BENCH_DATA ?= ../shared/data/mvtec_ad/bottle ../shared/data/magnetic_tile/magnetic_tile ../shared/data/elpv/poly \
	../shared/data/bsdata/ballscrew
BENCH_OUT ?= results
# The anomalib peer (PatchCore) runs in a venv of its own; see the harness's docstring for its install.
PEER_PYTHON ?= ../anomalib-venv/bin/python
PEER_HARNESS ?= ../shared/tools/peers/anomalib_fewshot.py
PEER_K ?= 1 4 8
# The harness uses a scratch folder TMP it never defines (a NameError before any fit): given here.
PEER_RUN = $(PEER_PYTHON) -c "import pathlib, runpy, sys, tempfile; sys.argv = sys.argv[1:]; \
	runpy.run_path(sys.argv[0], {'TMP': pathlib.Path(tempfile.mkdtemp())}, '__main__')" $(PEER_HARNESS)

.PHONY: install demo lint test bench bench-ablation bench-peer bench-sweep bench-line bench-serve bench-review bench-export bench-negatives bench-replay \
	review-screenshots gpu-check stack-up stack-down clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: $(STAMP)
	$(BIN)/fsad demo

# Two worker processes (pytest-xdist), a test file each at a time: a file's module-scoped stack is
# started once, and the other core runs the next file meanwhile.
TEST_WORKERS ?= -n 2 --dist loadfile

# One BLAS/OpenMP thread per process: the tests run a trainer beside real servers on 2 cores,
# where spinning OpenMP threads were measured 6x slower than one thread.
# The reliability suite runs in a process of its own: its Prefect test harness must not inherit
# event/log workers that earlier in-process flows left pointing at stopped servers.
# ruff, configured in pyproject.toml; part of `make test`.
lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest $(TEST_WORKERS) --ignore=tests/reliability
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/python -m pytest $(TEST_WORKERS) tests/reliability

# Slow benchmarks (not part of `make test`): pretrained, default and fast, k = 1 4 8, seeds 0 1 2.
bench: $(STAMP)
	$(BIN)/fsad bench --data $(BENCH_DATA) --k 1 4 8 --seeds 0 1 2 --methods pretrained default fast \
		--out $(BENCH_OUT)/bench.json --report $(BENCH_OUT)/bench.md

# The ablation at k = 4: instance, instance+cross, full (pretrained and default come from `bench`).
bench-ablation: $(STAMP)
	$(BIN)/fsad bench --data $(BENCH_DATA) --k 4 --seeds 0 1 2 --methods instance instance+cross full \
		--out $(BENCH_OUT)/ablation.json --report $(BENCH_OUT)/ablation.md

# The nightly sweep on the real stack: four products with one worker of the pool, then two (one run
# at a time each, one thread a run, so two workers on one machine stand for two machines); prints
# both wall times and their ratio.
bench-sweep: $(STAMP)
	OMP_NUM_THREADS=1 FSAD_WORKER_LIMIT=1 $(BIN)/python -m pytest -s -k sweep_on_two_workers_against_one tests/integration/test_deployments.py

# The line loop simulated on the shared sets (k = 4, 5 days of 60 parts, 12 reviews a day), seeds 0 1 2;
# a (set, seed) already done is skipped, so a stopped run resumes.
LINE_SEEDS ?= 0 1 2
bench-line: $(STAMP)
	@for set in $(BENCH_DATA); do for seed in $(LINE_SEEDS); do \
		name=$$(basename $$set)-$$seed; out=$(BENCH_OUT)/line/$$name.json; \
		if [ -f $$out ]; then echo "$$out: done"; continue; fi; \
		OMP_NUM_THREADS=1 $(BIN)/fsad simulate --data $$set --k 4 --days 5 --per-day 60 --reviews 12 \
			--defect-share 0.1 --seed $$seed --out $$out --plot $(BENCH_OUT)/line/$$name.png || exit 1; \
	done; done

# The review page with 1,000 queued images on the folder store: median of 20 warm requests, one card and a grid.
bench-review: $(STAMP)
	$(BIN)/python -m flows.review.bench --queued 1000

# The review page's pictures in the README, taken in headless Chromium from the demo's generated product.
SHOT_HOME ?= $(BENCH_OUT)/review-demo
review-screenshots: $(STAMP)
	$(BIN)/fsad demo --workdir $(SHOT_HOME)
	$(BIN)/python -m flows.review.screenshots --home $(SHOT_HOME) --out docs/img

# Latency of the served model, one image a request: make bench-serve SERVE_MODEL=DIR SERVE_IMAGES=DIR
bench-serve: $(STAMP)
	$(BIN)/python -m flows.mlops.serve_latency $(SERVE_MODEL) $(SERVE_IMAGES) $(BENCH_OUT)/serve

# The exported model against torch, one thread each, on the same fitted models (fast and default, k = 4):
# images a second of each, their ratio beside backbone_ms_per_image, and how far the two agree.
bench-export: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m flows.cli.export_bench --data $(BENCH_DATA) --k 4 --seed 0 \
		--methods fast default --out $(BENCH_OUT)/export.json

# Confirmed defects as fine-tuning negatives (loop.defect_negatives), with and without, on the same images.
bench-negatives: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m flows.cli.negatives_bench --data $(BENCH_DATA) --seeds 0 1 2 \
		--out $(BENCH_OUT)/negatives.json

# The labelled benchmark against the held-out truth with the model fixed: the queue's draws replayed 200 times.
bench-replay: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m flows.cli.replay_bench --data $(BENCH_DATA) --out $(BENCH_OUT)/replay.json

# Side by side: the peer's PatchCore, then fsad's pretrained, default and fast, on the same sets, k and
# seed, one thread each, one after the other in one run; compare the records' ratios, not seconds.
bench-peer: $(STAMP)
	for k in $(PEER_K); do \
		OMP_NUM_THREADS=1 $(PEER_RUN) --k $$k --seeds 0 --models patchcore --threads 1 \
			--out $(BENCH_OUT)/peer_k$$k.jsonl && \
		OMP_NUM_THREADS=1 $(BIN)/fsad bench --data $(BENCH_DATA) --k $$k --seeds 0 --methods pretrained default fast \
			--device cpu --out $(BENCH_OUT)/side_by_side_k$$k.json || exit 1; \
	done

# On a CUDA machine: fit and score bottle and Magnetic Tile at k = 4 there, beside the CPU records of
# `make bench-peer` (image AUROC equal within 0.005); fit seconds, ms at batch 1, images/s at batch 64.
gpu-check: $(STAMP)
	$(BIN)/python -m flows.cli.gpu_check ../shared/data/mvtec_ad/bottle ../shared/data/magnetic_tile/magnetic_tile \
		--cpu-record $(BENCH_OUT)/side_by_side_k4.json

stack-up: $(STAMP)
	$(BIN)/fsad stack up

stack-down: $(STAMP)
	$(BIN)/fsad stack down

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
