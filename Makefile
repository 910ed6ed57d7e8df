# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint typecheck install clean browser

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch/torchvision first and pinned: pip takes them from this machine's disk; other versions
# download gigabytes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on a built-in default: resnet18 (random init) -> validated, optimized ONNX + static INT8
# calibrated on the built-in photos, then every backend benchmarked on the same inputs.
# --auto: the random-init resnet18's INT8 file is outside the default 1-point gate (centered cosine); --auto keeps
# its most error-adding nodes in FP32 until it is within it
demo: $(STAMP)
	$(BIN)/python cli.py convert resnet18 --int8 --auto --calib imagenet_subset --out artifacts/demo
	$(BIN)/python cli.py bench artifacts/demo --backends eager,torchscript,ort --batch-sizes 1,4 --warmup 3 --iters 20
	@echo "report: artifacts/demo/bench/results.html (results.json is the source of truth; .csv and .md beside it)"

# Two workers (the 2-core CI machine; TEST_WORKERS=1 runs it in one process), a whole test file per worker so each
# module-scoped fixture (a converted model) is built once.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Optional: Debian's chromium, for the HTML report's screenshot test. Installs only as root with apt and
# never fails: without chromium that one test skips.
browser:
	@if command -v chromium >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -qq \
	    --no-install-recommends chromium fonts-dejavu-core) >/dev/null 2>&1 \
	  || echo "chromium could not be installed: the report screenshot test will skip"; \
	else echo "no chromium (installing it needs root and apt): the report screenshot test will skip"; fi

# The recorded CPU benchmarks (minutes each; results in benchmarks/results/). On a GPU machine also
# run `$(BIN)/python benchmarks/run_gpu.py`.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_cpu.py
	$(BIN)/python benchmarks/run_quant.py
	$(BIN)/python benchmarks/run_int8_layouts.py
	$(BIN)/python benchmarks/int8_trt_cpu.py
	$(BIN)/python benchmarks/calib_memory.py
	$(BIN)/python benchmarks/run_prune.py
	$(BIN)/python benchmarks/run_serving.py
	$(BIN)/python benchmarks/run_grpc.py
	$(BIN)/python benchmarks/run_transformer.py
	$(BIN)/python benchmarks/run_sweep.py
	$(BIN)/python benchmarks/run_openvino_precision.py
	$(BIN)/python benchmarks/run_fidelity.py
	$(BIN)/python benchmarks/run_deploy.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy core convert runtimes calibration reports serving sweep cli.py

clean:
	rm -rf artifacts .pytest_cache .mypy_cache .ruff_cache
