# The two commands of the quick start: `make demo` and `make test`.
# Each installs what it needs first: Debian packages (if missing) and a .venv at the repo root.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export TCP_NODELAY := 1

.PHONY: demo test test-fast soak lint system-packages demo-model registry-models bench lint-imports clean

system-packages:
	@if ! { { command -v Orthanc || test -x /usr/sbin/Orthanc; } && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so && command -v storescu && command -v dciodvfy && command -v systemd-analyze \
			&& ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq orthanc orthanc-dicomweb dcmtk dicom3tools systemd postgresql >/dev/null || exit 1; \
		$(SUDO) systemctl disable --now orthanc postgresql >/dev/null 2>&1 || true; \
	fi

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: system-packages $(STAMP)
	$(PY) scripts/demo.py

# The guard rails first (seconds): ruff, then the import-linter layer contracts.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

test: system-packages $(STAMP) lint
	$(PY) -m pytest -q -m "not soak" tests

# A day in one run (~20 min): 60 studies from 4 senders while the node, its worker and the PACS
# are killed and restarted at random; not part of `make test`.
soak: system-packages $(STAMP)
	$(PY) -m pytest -q -s -m soak tests/e2e/test_soak.py

# The edit-test loop: everything that starts no server and no subprocess (tests/conftest.py enforces the mark).
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e" tests

demo-model: $(STAMP)
	$(PY) scripts/make_demo_model.py --out models/demo-petct

registry-models: $(STAMP)
	$(PY) scripts/make_registry_models.py

lint-imports: $(STAMP)
	$(VENV)/bin/lint-imports

# Every CPU bench in one run, then one table of ratios (bench/summary.py; ~1 h on 2 cores).
# bench/bench_gpu_glow.py needs a GPU: run it there by hand.
bench: system-packages $(STAMP)
	$(PY) bench/summary.py

clean:
	rm -rf $(VENV) var demo-out .pytest_cache
