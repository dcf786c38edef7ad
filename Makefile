# One-command set-up: `make test` (venv + install + suite) and `make demo` (end-to-end tiny run).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench bench-quality clean comfy-deps ui-deps browser-deps

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import torch, diffusers, peft, open_clip, safetensors"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint browser-deps
	@if [ -f $(COMFYUI_PATH)/requirements.txt ] && ! cmp -s $(COMFYUI_PATH)/requirements.txt $(VENV)/.comfy-installed; then \
		echo "ComfyUI checkout at $(COMFYUI_PATH): installing its requirements for tests/nodes (new or changed)"; \
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
# `make test` installs its requirements when a checkout is found (COMFYUI_PATH, default ~/ComfyUI) and the stamp
# (a copy of the requirements it installed) differs from the checkout's: a ComfyUI update that adds one reinstalls.
COMFYUI_PATH ?= $(HOME)/ComfyUI
comfy-deps: $(STAMP)
	test -f $(COMFYUI_PATH)/requirements.txt || (echo "no ComfyUI checkout at $(COMFYUI_PATH)"; exit 1)
	grep -vE '^(torch|torchvision|torchaudio)$$|^#|^$$' $(COMFYUI_PATH)/requirements.txt > $(VENV)/comfy-reqs.txt
	echo requests >> $(VENV)/comfy-reqs.txt
	$(BIN)/pip install -q --disable-pip-version-check -r $(VENV)/comfy-reqs.txt 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import scipy, torchsde, aiohttp, requests" \
		&& cp $(COMFYUI_PATH)/requirements.txt $(VENV)/.comfy-installed \
		|| echo "ComfyUI's requirements did not install: tests/nodes will be skipped with one line"

# Real-browser test of the web extension (tests/nodes/test_training_browser.py): npm playwright-core + Debian
# chromium. `make test` runs browser-deps, which installs whatever is missing from the package registries and,
# where it cannot (no npm, not root, no apt), says so in one line; the browser test then skips with its reason.
ui-deps:
	cd tests/ui && npm install --no-audit --no-fund
	test -x /usr/bin/chromium || echo "also needed: apt-get install -y chromium"

browser-deps:
	@if [ ! -d tests/ui/node_modules/playwright-core ]; then \
		if command -v npm >/dev/null; then \
			(cd tests/ui && timeout 600 npm install --no-audit --no-fund --silent) \
				|| echo "browser checks: npm install in tests/ui failed; they will be skipped"; \
		else echo "browser checks: npm is not installed; they will be skipped"; fi; fi
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "browser checks: installing Debian chromium (apt-get)"; \
			( DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
				|| (timeout 300 apt-get update -q >/dev/null 2>&1 \
					&& DEBIAN_FRONTEND=noninteractive timeout 900 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1) ) \
				|| echo "browser checks: apt-get install chromium failed; they will be skipped"; \
		else echo "browser checks: chromium is missing and cannot be installed here (needs root and apt-get)"; fi; fi
