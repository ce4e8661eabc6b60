# The two set-up commands of the README: `make repro` (the main job) and `make test` (the test suite).
# Both install what they need first. torch is pinned: 2.13.0 is a CPU build on CPU machines here
# (an unpinned torch would pull a multi-GB CUDA build) and the regular wheel on a GPU machine.
PYTHON ?= python3
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install repro test

install:
	$(PYTHON) -m pip install -q "torch==2.13.0" -e ".[test]"

repro: install
	$(PYTHON) -m dvc repro

test: install
	$(PYTHON) -m pytest -n 2 --dist loadfile
