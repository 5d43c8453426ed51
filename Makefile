# Quick start: `make demo` runs the main job on defaults, `make test` runs the CPU tests.
# Both create the virtual environment in .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test tables tables-openvino clean

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

test: install
	$(BIN)/python -m pytest -q

# Rebuild the shipped CPU latency tables (ONNX Runtime and OpenVINO, 224x224, batch 1, timed in-network);
# about a minute each (vgg19_bn several). Make them on a quiet machine. No pruning options: compress
# searches without them by default (--prune profiles a table with them).
tables: install
	$(BIN)/dpcompress profile --model torchvision:mobilenet_v2 --backend onnxruntime --no-prune --overwrite --out latency_tables/cpu_onnxruntime/mobilenet_v2.csv
	$(BIN)/dpcompress profile --model 'torchvision:mobilenet_v2?width_mult=1.4' --backend onnxruntime --no-prune --overwrite --out latency_tables/cpu_onnxruntime/mobilenet_v2_w1.4.csv
	$(BIN)/dpcompress profile --model torchvision:vgg19_bn --backend onnxruntime --no-prune --overwrite --out latency_tables/cpu_onnxruntime/vgg19_bn.csv
	$(BIN)/dpcompress profile --model torchvision:resnet18 --backend onnxruntime --no-prune --overwrite --out latency_tables/cpu_onnxruntime/resnet18.csv
	$(MAKE) tables-openvino

tables-openvino: install
	$(BIN)/dpcompress profile --model torchvision:mobilenet_v2 --backend openvino --no-prune --overwrite --out latency_tables/cpu_openvino/mobilenet_v2.csv
	$(BIN)/dpcompress profile --model 'torchvision:mobilenet_v2?width_mult=1.4' --backend openvino --no-prune --overwrite --out latency_tables/cpu_openvino/mobilenet_v2_w1.4.csv

clean:
	rm -rf $(VENV) demo_out
