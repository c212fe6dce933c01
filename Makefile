# seqrank: two commands do everything — `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
RESULTS_RUN ?= runs/kuairand
MOVIELENS_RUN ?= runs/movielens
RESULTS_SEEDS ?= 0,1,2,3,4
EVENTS ?= data/kuairand/events.tsv.gz
STORE ?= sqlite:///$(abspath $(RUN))/store.db
STAMP := $(VENV)/.installed

.PHONY: install demo train export serve test test-fast bench results results-movielens lint-deploy movielens clean

install: $(STAMP)   ## system packages (apt-get) + .venv with pinned packages; idempotent

$(STAMP): requirements.txt requirements.lock pyproject.toml scripts/install_system.sh
	bash scripts/install_system.sh
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==24.3.1
	$(BIN)/pip install -q -r requirements.txt -c requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# checkov lives in its own venv: its ~100 pinned dependencies would otherwise constrain the runtime ones
CHECKOV := .venv-checkov
$(CHECKOV)/.installed: requirements-checkov.txt
	test -x $(CHECKOV)/bin/python || $(PY) -m venv $(CHECKOV) || python3 -m venv $(CHECKOV)
	$(CHECKOV)/bin/pip install -q -r requirements-checkov.txt
	touch $@

lint-deploy: $(CHECKOV)/.installed   ## checkov on the Dockerfile and deploy/ (kept findings are annotated with reasons)
	$(CHECKOV)/bin/checkov --quiet --compact --skip-download --file Dockerfile --file docker/jobs.Dockerfile --framework dockerfile
	$(CHECKOV)/bin/checkov --quiet --compact --skip-download --directory deploy --framework kubernetes

movielens: install   ## fetch MovieLens 100K (not redistributable, so not in git) -> data/external/movielens-100k
	$(BIN)/python scripts/fetch_movielens.py

train: install
	$(BIN)/seqrank train --events $(EVENTS) --out $(RUN)

# the results tables (README, docs/results.md) and plot from every evaluated run, KuaiRand and MovieLens
RESULTS_TABLE = $(BIN)/python scripts/results_table.py --run KuaiRand=$(RESULTS_RUN) \
	$$(test -f $(MOVIELENS_RUN)/metrics.json && echo --run MovieLens-100K=$(MOVIELENS_RUN))

results: install   ## KuaiRand: train, evaluate over 5 seeds and 5 user folds, write the results tables (~40 min)
	$(BIN)/seqrank train --events $(EVENTS) --out $(RESULTS_RUN)
	$(BIN)/seqrank evaluate --run $(RESULTS_RUN) --seeds $(RESULTS_SEEDS) --user-folds 5
	$(RESULTS_TABLE)

results-movielens: movielens   ## the same on MovieLens 100K, a log never tuned on (~40 min)
	$(BIN)/seqrank train --events data/external/movielens-100k/ratings.csv --out $(MOVIELENS_RUN)
	$(BIN)/seqrank evaluate --run $(MOVIELENS_RUN) --seeds $(RESULTS_SEEDS) --user-folds 5
	if test -f $(RESULTS_RUN)/metrics.json; then $(RESULTS_TABLE); fi

export: install
	$(BIN)/seqrank export --run $(RUN)

serve: install   ## serve an exported run on :8000 (HTTP) :8001 (gRPC) :8002 (metrics); Ctrl-C stops
	$(BIN)/seqrank serve --repository $(RUN)/model_repository --store $(STORE)

demo: install   ## train on the embedded KuaiRand sample, export, serve, rank over gRPC and HTTP, stop
	$(BIN)/python scripts/demo.py --events $(EVENTS) --run $(RUN)

test: install lint-deploy   ## everything that runs here (real tritonserver, real Redis); GPU/TensorRT parts skip and say why
	$(BIN)/python -m pytest tests -q

bench: install   ## side-by-side serving benchmark -> perf/results/
	$(BIN)/python perf/bench.py --run $(RUN)

# on a lent GPU machine (torch with CUDA only, no venv): `make gpu-check OUT=$OUT/gpu`; GPU_CHECK_ARGS adds options
.PHONY: gpu-check
gpu-check:   ## one-shot GPU check of the served ranker (<= 6 min) -> $(OUT)/results.json, default build/gpu_check
	@echo "gpu-check: results -> $(or $(OUT),build/gpu_check)/results.json and results.md (rewritten after every point)"
	$$(command -v python || command -v python3) perf/gpu_check.py --out $(or $(OUT),build/gpu_check) $(GPU_CHECK_ARGS)

clean:
	rm -rf runs build
