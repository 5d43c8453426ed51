# Quick start: `make demo` runs the main job on defaults, `make test` runs the CPU tests (`make test-fast`: the
# quick ones).
# Both create the virtual environment in .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-yolo-tests demo test test-bench test-fast tables tables-openvino bench-quick clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 torchvision==0.28.0
	$(BIN)/pip install -q -c constraints.txt -e '.[torch,plot,test,openvino,timm]'
	touch $(STAMP)

MODEL ?= torchvision:mobilenet_v2
BUDGET ?= 0.7

# The main job on the defaults: mobilenet_v2, CPU, ONNX Runtime (reuses the shipped table).
demo: install
	$(BIN)/dpcompress trace --model $(MODEL)
	$(BIN)/dpcompress compress --model $(MODEL) --budget-ratio $(BUDGET) --out-dir demo_out

# The test suite; the benchmarks' quick runs (marked bench, some 3 minutes) are make test-bench, which CI runs too.
test: install
	$(BIN)/python -m pytest -q -m "not bench"

test-bench: install
	$(BIN)/python -m pytest -q -m bench

# The Ultralytics YOLO tests' extra (AGPL-3.0, so not in install): ultralytics and the OpenCV it imports, without
# their other dependencies; the tests skip without it.
install-yolo-tests: install
	$(BIN)/pip install -q --no-deps 'ultralytics==8.4.0' 'opencv-python-headless>=4.6'

# The tests that take under about 10 s each (not marked slow): about 2 minutes on an idle machine.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Rebuild the shipped CPU latency tables (ONNX Runtime and OpenVINO, 224x224, batch 1, timed in-network),
# with pruning options (compress searches them by default; a table with them serves --no-prune too); the
# minutes each took are in docs/results.md. Make them on a quiet machine.
tables: install
	$(BIN)/dpcompress profile --model torchvision:mobilenet_v2 --backend onnxruntime --overwrite --out latency_tables/cpu_onnxruntime/mobilenet_v2.csv
	$(BIN)/dpcompress profile --model 'torchvision:mobilenet_v2?width_mult=1.4' --backend onnxruntime --overwrite --out latency_tables/cpu_onnxruntime/mobilenet_v2_w1.4.csv
	$(BIN)/dpcompress profile --model torchvision:vgg19_bn --backend onnxruntime --overwrite --out latency_tables/cpu_onnxruntime/vgg19_bn.csv
	$(BIN)/dpcompress profile --model torchvision:resnet18 --backend onnxruntime --overwrite --out latency_tables/cpu_onnxruntime/resnet18.csv
	$(BIN)/dpcompress profile --model torchvision:resnet34 --backend onnxruntime --overwrite --out latency_tables/cpu_onnxruntime/resnet34.csv
	$(MAKE) tables-openvino

tables-openvino: install
	$(BIN)/dpcompress profile --model torchvision:mobilenet_v2 --backend openvino --overwrite --out latency_tables/cpu_openvino/mobilenet_v2.csv
	$(BIN)/dpcompress profile --model 'torchvision:mobilenet_v2?width_mult=1.4' --backend openvino --overwrite --out latency_tables/cpu_openvino/mobilenet_v2_w1.4.csv

# Every benchmark's --quick mode (a tiny model, one repeat: a smoke check, not figures), each to its end from
# an empty folder (nothing resumed); records under out/bench_quick/<benchmark>/record.json.
bench-quick: install
	@set -e; for script in benchmarks/bench_*.py benchmarks/sweep_*.py; do \
		name=$$(basename $$script .py); echo "== $$name --quick"; rm -rf out/bench_quick/$$name; \
		OMP_NUM_THREADS=1 $(BIN)/python $$script --quick --out-dir out/bench_quick/$$name; \
	done

# The GPU check (issue 31, benchmarks/gpu_check.py): about 8 minutes on one CUDA GPU; needs no venv, only
# torch, torchvision, numpy, onnx, onnxruntime and click where it runs. GPU_CHECK=--dry-run: the CPU path.
.PHONY: gpu-check
GPU_CHECK_OUT ?= out/gpu_check
gpu-check:
	PYTHONPATH=. $(PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK)

clean:
	rm -rf $(VENV) demo_out
