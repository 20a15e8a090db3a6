# One command sets up and runs the main job; one command runs the tests.
#   make demo   virtual environment + install + the whole pipeline on the built-in corpus
#   make test   the test suite (real DeepSpeed processes on the CPU)
PYTHON ?= python3
VENV   ?= .venv
OUT    ?= runs/demo

.PHONY: demo test install clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

demo: install
	VENV=$(VENV) OUT=$(OUT) bash launch/demo.sh

# pytest exits 5 when it collects no tests; that is not a failure of the suite itself.
test: install
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/python -m pytest -q tests || [ $$? -eq 5 ]

clean-demo:
	rm -rf $(OUT)
