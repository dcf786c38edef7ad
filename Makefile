# One-command set-up: `make test` (venv + install + suite) and `make demo` (end-to-end tiny run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench bench-quality clean comfy-deps ui-deps

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, diffusers, peft, open_clip, safetensors"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint
	@if [ -f $(COMFYUI_PATH)/requirements.txt ] && [ ! -f $(VENV)/.comfy-installed ]; then \
		echo "ComfyUI checkout at $(COMFYUI_PATH): installing its requirements for tests/nodes"; \
		$(MAKE) --no-print-directory comfy-deps; fi
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/python -m train demo --out demo_out

bench: $(STAMP)
	$(BIN)/python bench/layer.py
	$(BIN)/python bench/unet_step.py
	$(BIN)/python bench/train_step.py
	$(BIN)/python bench/compile_check.py
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/methods.py

bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo_out bench/out

# Local ComfyUI checkout for the integration tests (never committed): see README "Testing with ComfyUI".
# `make test` installs its requirements once when a checkout is found (COMFYUI_PATH, default ~/ComfyUI).
COMFYUI_PATH ?= $(HOME)/ComfyUI
comfy-deps: $(STAMP)
	test -f $(COMFYUI_PATH)/requirements.txt || (echo "no ComfyUI checkout at $(COMFYUI_PATH)"; exit 1)
	grep -vE '^(torch|torchvision|torchaudio)$$|^#|^$$' $(COMFYUI_PATH)/requirements.txt > $(VENV)/comfy-reqs.txt
	echo requests >> $(VENV)/comfy-reqs.txt
	$(BIN)/pip install -q --disable-pip-version-check -r $(VENV)/comfy-reqs.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import scipy, torchsde, aiohttp, requests" && touch $(VENV)/.comfy-installed \
		|| echo "ComfyUI's requirements did not install: tests/nodes will be skipped with one line"

# Real-browser test of the web extension (tests/nodes/test_training_browser.py): playwright-core + Debian chromium.
ui-deps:
	cd tests/ui && npm install --no-audit --no-fund
	test -x /usr/bin/chromium || echo "also needed: apt-get install -y chromium"
