# nurec-jax: `make test` and `make demo` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extras installed into the venv: test tools always; add cuda12/cuda13 for a GPU machine,
# e.g. `make install EXTRAS=test,cuda13`.
EXTRAS ?= test
PYTEST_ARGS ?= -n 2 --dist loadgroup --durations=15

.PHONY: install test lint format demo protos sample-scene lock clean

$(PY):
	@PYTHON=$$(tools/find_python.sh) || exit 1; \
	echo "creating $(VENV) with $$PYTHON"; \
	"$$PYTHON" -m venv $(VENV)

# constraints.txt pins every package to the versions the suite was verified with, so a fresh clone
# (CI, a user) installs exactly those; `make lock` refreshes it.
CONSTRAINTS ?= constraints.txt

$(STAMP): $(PY) pyproject.toml $(CONSTRAINTS)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest $(PYTEST_ARGS) tests

# ruff (pinned in the test extra): lint rules and formatting, as CI checks them; `make format` fixes both.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

demo: $(STAMP)
	$(PY) -m nurec_jax.cli.scene_info
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) tools/run_demo.py --output-dir=out/demo

sample-scene: $(STAMP)
	$(PY) tools/make_sample_scene.py --output nurec_jax/data/sample_scene.usdz

# Re-resolve today's releases in a scratch venv and rewrite constraints.txt from it.
lock:
	@PYTHON=$$(tools/find_python.sh) || exit 1; rm -rf .venv-lock && "$$PYTHON" -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet -e ".[test]"
	{ sed -n '1,/^pip==/p' $(CONSTRAINTS) | sed '$$d'; .venv-lock/bin/python -m pip --version | awk '{print "pip==" $$2}'; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | grep -v '^nurec-jax'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf .venv-lock
	@echo "constraints.txt refreshed; run 'make clean test' before committing it"

clean:
	rm -rf $(VENV) build *.egg-info
