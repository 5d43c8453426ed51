# Quick start: `make demo` runs the main job on defaults, `make test` runs the CPU tests.
# Both create the virtual environment in .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test tables clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0 torchvision==0.28.0
	$(BIN)/pip install -q -c constraints.txt -e '.[torch,plot,test]'
	touch $(STAMP)

demo: install
	$(BIN)/dpcompress trace --model torchvision:mobilenet_v2
	$(BIN)/dpcompress export --model torchvision:mobilenet_v2 --plan-all-removed --format onnx --out demo_out/mobilenet_v2_merged.onnx --verify

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) demo_out
