# `make demo` and `make test` build .venv from nothing on first use; later runs reuse it
# until pyproject.toml changes.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup browser test test-fast demo clean image image-test image-name

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

test: setup browser
	$(PY) -m pytest -q --durations=30

# tests/test_mlflow_ui.py drives Debian's Chromium: installed here when missing and this is
# root with apt (as on CI; about 20 s), else the test skips and says why.
browser:
	@test -x /usr/bin/chromium || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get update -qq >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "make: /usr/bin/chromium not installed; tests/test_mlflow_ui.py will skip"

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	$(VENV)/bin/skinlesion demo

clean:
	rm -rf $(VENV) .pytest_cache

# Container image (not part of `make test`): `make image` builds it with docker where a daemon
# answers, else with buildah from a Debian base made here with debootstrap; `make image-test`
# builds it, then runs the CLI, the whole pipeline (kfp.local) and the DVC/S3 data step inside
# it (image/test.sh). The tag is pipeline/kfp_components.py's DEFAULT_IMAGE, the one the
# compiled pipeline names (tests/test_dockerfile.py checks it carries pyproject's version).
IMAGE    ?= $(shell sed -n 's/^DEFAULT_IMAGE = "\(.*\)"$$/\1/p' pipeline/kfp_components.py)
BASE_TAG ?= localhost/skinlesion-base:bookworm
IMAGE_ENV = IMAGE='$(IMAGE)' BASE_TAG='$(BASE_TAG)'

image:
	$(IMAGE_ENV) image/build.sh

image-test: image setup
	$(IMAGE_ENV) image/test.sh

image-name:
	@echo $(IMAGE)

# The MLflow UI in headless Chromium (Debian's package): a real server, two tiny real runs, a
# registered model with both aliases; checks the pages and keeps their screenshots for the
# README (docs/ui_pictures.py; tests/test_mlflow_ui.py runs it, marked slow).
.PHONY: ui-pictures
ui-pictures: setup
	$(PY) docs/ui_pictures.py --out docs/images
