# The README's two commands: `make demo` and `make test`. Each builds .venv first if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test check install browser lab s3 tensorboard bench bench-loading bench-ddp bench-fsdp bench-decoders bench-demo bench-gpu bench-report sweep lint format clean

demo: $(STAMP)  ## execute every notebook against the embedded S3 and a local cluster
	$(BIN)/python -m helpers.run.demo

test: $(STAMP) browser lint  ## lint, then the helpers' tests, every notebook headless and nbval's kept outputs
	$(BIN)/python -m pytest

check: $(STAMP) lint  ## the fast tier, for the edit-test loop: no cluster, notebook, browser or benchmark
	$(BIN)/python -m pytest -m "not (slow or notebook or browser or twohost or bench)"

install: $(STAMP)

$(STAMP): pyproject.toml kernel/pyproject.toml kernel/kernel.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]' ./kernel
	@# Commits keep notebooks without outputs (but the cells marked keep_output, for nbval).
	@git rev-parse --git-dir >/dev/null 2>&1 && $(BIN)/nbstripout --install --attributes .gitattributes || true
	@# dask.visualize draws task graphs with Graphviz's `dot` (a system package, optional).
	@command -v dot >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq graphviz) >/dev/null 2>&1; } || \
	  echo "note: Graphviz's 'dot' is missing: notebook 01 will describe task graphs in words"
	touch $(STAMP)

# Test-only system packages, for the test route alone (`make demo` and `make lab` need no browser):
# tests/test_browser.py drives JupyterLab in Debian's Chromium through Selenium's chromedriver.
browser:
	@command -v chromedriver >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1; } || \
	  echo "note: no chromium/chromedriver: tests/test_browser.py will skip"

# jupyter/jupyter_server_config.py: on a hub or Binder, the Dask dashboard link goes through the hub's
# proxy. Root (a container) needs --allow-root. The Dask and GPU panels come with `make install`.
lab: $(STAMP)  ## JupyterLab on loopback, rooted at the repository (the notebooks' ../img resolves)
	$(BIN)/jupyter lab --config="$(CURDIR)/jupyter/jupyter_server_config.py" \
	  --ServerApp.ip=127.0.0.1 --ServerApp.root_dir="$(CURDIR)" \
	  --LabApp.default_url=/lab/tree/notebooks/01-dask-basics.ipynb \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

# The monitor writes every job's run beside its checkpoint folder (build/checkpoints/runs/ for the
# notebooks' defaults) or under build/runs/; TensorBoard finds every run under build/.
tensorboard: $(STAMP)  ## TensorBoard on 127.0.0.1:6006: every training run under build/, side by side
	$(BIN)/tensorboard --logdir build --host 127.0.0.1 --port 6006

s3: $(STAMP)  ## keep an embedded S3 server running (notebooks with s3_endpoint='embedded' reuse it)
	$(BIN)/python -m helpers.s3.server serve --dir .s3data

bench: bench-loading bench-ddp bench-fsdp bench-decoders bench-report  ## CPU benchmarks, each writing a record to bench/results/

bench-loading: $(STAMP)  ## data loading: shards and per-object vs ImageFolder and the peers (2 runs)
	$(BIN)/python -m bench.bench_loading --images photos
	$(BIN)/python -m bench.bench_loading --images synthetic

bench-ddp: $(STAMP)  ## DDP launch and per-step time: Dask vs torchrun
	$(BIN)/python -m bench.bench_ddp

bench-fsdp: $(STAMP)  ## per-rank state, peak memory and step time: FSDP vs DDP
	$(BIN)/python -m bench.bench_fsdp

bench-decoders: $(STAMP)  ## JPEG decoding: TorchCodec vs PIL and torchvision (CPU; CUDA on a GPU)
	$(BIN)/python -m bench.decoders

bench-demo: $(STAMP)  ## the demo's runtimes, each notebook's against the time it states
	$(BIN)/python -m bench.demo_runtimes

bench-gpu: $(STAMP)  ## notebook 04's route on a GPU vs tensors already there (CPU: a smoke run)
	$(BIN)/python -m bench.bench_gpu

bench-report: $(STAMP)  ## rebuild README.md's benchmark table from the newest records
	$(BIN)/python -m bench.record report

sweep: $(STAMP)  ## the scaling sweep alone: notebook 04 on 1 and 2 workers
	$(BIN)/python -m helpers.run.sweep --workers 1 2

lint: $(STAMP)
	$(BIN)/ruff check helpers tests bench notebooks jupyter
	$(BIN)/ruff format --check helpers tests bench notebooks jupyter

format: $(STAMP)
	$(BIN)/ruff format helpers tests bench notebooks jupyter

clean:
	rm -rf build .pytest_cache
