# `make run` and `make test` work on a fresh machine: they install the system
# packages the tests use (as root, via apt), create .venv and install sshspec.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint fuzz bench system-packages generated agent clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

system-packages:
	@PYTHON=$(PYTHON) sh .ci/system-packages

run: $(STAMP)
	$(BIN)/sshspec serve

# mypy reads its setup from pyproject.toml: fsm/ strict, adapters/ and codes/ default;
# tests/ and bench/ are not type-checked.
lint: $(STAMP)
	$(BIN)/ruff check fsm adapters codes tests bench
	$(BIN)/mypy

test: system-packages $(STAMP) lint
	rm -rf .test-logs
	$(BIN)/python -m pytest -q -p no:cacheprovider tests
	@# Every live server's log must replay against the specs, complete, and
	@# together they must exercise every transition of every spec.
	@# (logs under .test-logs/limits/NAME=VALUE,.../ replay with those limits; the
	@# glob runs in the shell, after the tests wrote the logs)
	@logs="$$(ls .test-logs/*.jsonl .test-logs/limits/*/*.jsonl 2>/dev/null)"; \
	  $(BIN)/sshspec check --complete $$logs > .test-logs/check.txt || { cat .test-logs/check.txt; exit 1; }; \
	  echo "sshspec check --complete: $$(echo "$$logs" | wc -l) live-test logs replay against the specs"; \
	  $(BIN)/sshspec coverage --summary --fail-under 100 $$logs

# Two processes: the engine campaign's hypothesis bookkeeping peaks at several GB
# (30,000 examples of 80 steps), which one process would keep through the live one.
fuzz: $(STAMP)
	SSHSPEC_FUZZ_PROFILE=long $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz_engine.py
	SSHSPEC_FUZZ_PROFILE=long $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_fuzz_live.py

bench: system-packages $(STAMP)
	$(BIN)/python bench/run.py

# The docker backend's guest agent (docker.agent): a static binary, so it runs in any
# image of this machine's architecture (for another, use that architecture's gcc).
AGENT := adapters/agent/sshspec-agent
agent: $(AGENT)

$(AGENT): adapters/agent/sshspec-agent.c
	gcc -static -Os -Wall -Wextra -Werror -s -o $@ $<

# Regenerate what is derived from the catalog and the specs (tests fail when stale).
generated: $(STAMP)
	$(BIN)/sshspec codes > CODES.md
	$(BIN)/sshspec diagram --readme README.md
	$(BIN)/sshspec schema > spec.schema.json

clean:
	rm -rf $(VENV) .test-logs .hypothesis $(AGENT)
