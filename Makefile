# nurec-jax: `make test` and `make demo` do all the set-up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Extras installed into the venv: test tools always; add cuda12/cuda13 for a GPU machine,
# e.g. `make install EXTRAS=test,cuda13`.
EXTRAS ?= test
PYTEST_ARGS ?= -n 2 --dist loadgroup --durations=15

.PHONY: install test demo protos sample-scene clean

$(PY):
	@PYTHON=$$(tools/find_python.sh) || exit 1; \
	echo "creating $(VENV) with $$PYTHON"; \
	"$$PYTHON" -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(PY) -m nurec_jax.cli.scene_info
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) tools/run_demo.py --output-dir=out/demo

sample-scene: $(STAMP)
	$(PY) tools/make_sample_scene.py --output nurec_jax/data/sample_scene.usdz

clean:
	rm -rf $(VENV) build *.egg-info
