# Set-up and checks for the xdsi-gateway. `make demo` and `make test` do everything on a fresh
# Debian machine (system packages are installed only when missing and only as root).

PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt
# Debian packages the test suite talks to (real peers) or needs to build a venv.
TEST_DEBS := python3-venv openssl postgresql orthanc dcmtk rsyslog rsyslog-gnutls

.PHONY: demo test unit lint venv venv-test system-deps clean

# One community (documents, then PACS -> KOS manifests -> RAD-69), then two (A's consumer
# reaches B's studies through A's initiating gateways). DEMO_ARGS: e.g. --no-federation,
# --federation-only, --workdir DIR.
DEMO_ARGS ?=
demo: venv
	$(BIN)/xdsi-gateway demo $(DEMO_ARGS)

test: system-deps venv-test
	$(BIN)/pytest -q -p no:cacheprovider
	$(MAKE) --no-print-directory lint

unit: venv-test
	$(BIN)/pytest -q -p no:cacheprovider tests/unit

lint: venv-test
	$(BIN)/ruff check gateway tests bench
	$(BIN)/mypy gateway

system-deps:
	@missing=""; for p in $(TEST_DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (run 'make test' as root, or install them)"; exit 1; \
	  fi; \
	fi

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required (spyne 2.14 runs on 3.11 only); set PYTHON=/path/to/python3.11"'
	$(PYTHON) -m venv $(VENV)

venv: $(BIN)/python
	$(PIP) -e .

venv-test: $(BIN)/python
	$(PIP) -e '.[test]'

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
