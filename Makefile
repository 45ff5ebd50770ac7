PY ?= .venv/bin/python
PROTOS := $(wildcard proto/ckpt/v1/*.proto)

.PHONY: venv proto proto-check lint test test-fast demo clean

venv: .venv/.done

.venv/.done: pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@

proto: venv
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. $(PROTOS)

# CI: the committed stubs must match the .proto files, and the public protos keep what
# the last release had (proto/ckpt/v1/released.json, from scripts/proto_snapshot.py --write).
proto-check: venv
	rm -rf .proto-check && mkdir -p .proto-check
	$(PY) -m grpc_tools.protoc -Iproto --python_out=.proto-check --pyi_out=.proto-check \
		--grpc_python_out=.proto-check $(PROTOS)
	diff -r -x __init__.py -x __pycache__ .proto-check/ckpt ckpt
	rm -rf .proto-check
	$(PY) -m pytest -q tests/unit/test_proto_compat.py  # no breaking change to the public protos

lint: venv
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	PYRIGHT_PYTHON_IGNORE_WARNINGS=1 .venv/bin/pyright --pythonpath $(PY)

test: venv proto-check lint
	$(PY) -m pytest -q --durations=25 tests

test-fast: venv
	$(PY) -m pytest -q tests/unit tests/proc -m "not vllm"

demo: venv
	$(PY) -m demo.run

clean:
	rm -rf .venv .proto-check
