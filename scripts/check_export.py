#!/usr/bin/env python3
"""Checks a folder written by `moi-studio export` with Python's transformers (and PEFT):

1. the model and tokenizer load, and the chat template renders a conversation;
2. the mean negative log-likelihood of a text equals what `moi-studio score` computes, and the
   logits at every position equal ours (`score --logits-out`) within 1e-4;
3. for LoRA runs, the base model with `adapter/` applied by PEFT gives the same logits as the
   merged model;
4. with --reference LOGITS_JSON (a golden model's `logits.json`, e.g. tests/data/golden/llama3,
   which uses Llama 3.1 rotary scaling), the exported model's logits on the reference prompts
   equal the reference within 1e-4: rotary scaling and weights survived the export.
   `MOI_EXPORT_GOLDEN=DIR cargo test --test golden an_exported_llama3` writes that export.

Usage: python scripts/check_export.py EXPORT_DIR [--bin target/release/moi-studio]
       python scripts/check_export.py EXPORT_DIR --reference tests/data/golden/llama3/logits.json
Needs: pip install torch transformers safetensors peft
"""
import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXT = "The capital of France is Paris. Two plus three is five.\n#### 5"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir")
    ap.add_argument("--bin", default="target/release/moi-studio")
    ap.add_argument("--reference", help="logits.json of a golden model to compare against")
    args = ap.parse_args()

    if args.reference:
        with open(args.reference) as f:
            ref = json.load(f)
        model = AutoModelForCausalLM.from_pretrained(args.export_dir, dtype=torch.float32).eval()
        worst = 0.0
        for prompt, want in zip(ref["prompts"], ref["logits"]):
            with torch.no_grad():
                got = model(torch.tensor([prompt])).logits[0]
            worst = max(worst, (got - torch.tensor(want)).abs().max().item())
        print(f"largest logit difference from {args.reference}: {worst:.2e}")
        print("OK" if worst < 1e-4 else "MISMATCH")
        return 0 if worst < 1e-4 else 1

    tok = AutoTokenizer.from_pretrained(args.export_dir)
    model = AutoModelForCausalLM.from_pretrained(args.export_dir, dtype=torch.float32).eval()
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    print("chat template renders:", repr(prompt[:80]))

    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(TEXT)
    logits_file = f.name + ".logits.json"
    out = subprocess.run(
        [args.bin, "score", "--model", args.export_dir, "--text-file", f.name, "--json",
         "--logits-out", logits_file],
        check=True, capture_output=True, text=True,
    ).stdout
    os.unlink(f.name)
    ours = json.loads(out)
    ours_nll = ours.get("mean_nll", ours.get("nll"))
    print(f"transformers nll {nll:.6f}, moi-studio nll {ours_nll:.6f} ({ids.shape[1]} tokens)")
    ok = math.isclose(nll, ours_nll, abs_tol=1e-4)
    with open(logits_file) as lf:
        dumped = json.load(lf)
    os.unlink(logits_file)
    same_ids = dumped["ids"] == ids[0].tolist()
    print(f"token ids {'equal' if same_ids else 'DIFFER'} ({len(dumped['ids'])} vs {ids.shape[1]})")
    ok = ok and same_ids
    if same_ids:
        diff = (torch.tensor(dumped["logits"]) - logits).abs().max().item()
        print(f"transformers vs moi-studio: max logit difference {diff:.2e} on the fixed text")
        ok = ok and diff < 1e-4

    adapter = os.path.join(args.export_dir, "adapter")
    if os.path.isdir(adapter):
        from peft import PeftModel

        with open(os.path.join(adapter, "adapter_config.json")) as f:
            base_path = json.load(f)["base_model_name_or_path"]
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        peft_model = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            adapted = peft_model(ids).logits[0]
        diff = (adapted - logits).abs().max().item()
        print(f"PEFT adapter on {base_path}: max logit difference from the merged model {diff:.2e}")
        ok = ok and diff < 1e-4
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
