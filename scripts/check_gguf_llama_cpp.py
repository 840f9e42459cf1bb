#!/usr/bin/env python3
"""Runs a GGUF written by `moi-studio export --gguf` in llama.cpp itself (llama-cpp-python) and
compares it with MoI Studio on the same text: the token ids, and the mean negative log-likelihood
(perplexity) of the text. Exit 0 when the ids are equal and the two NLLs agree within 1 %.

Usage: python scripts/check_gguf_llama_cpp.py FILE.gguf [--text tests/data/eiffel.txt]
           [--bin target/release/moi-studio]
Needs llama-cpp-python, which PyPI has as source only (it builds llama.cpp, ~20 minutes on two
cores):
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        ~/.cache/moi-bench-venv/bin/pip install llama-cpp-python
"""
import argparse
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--text", default=os.path.join(ROOT, "tests/data/eiffel.txt"))
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/moi-studio"))
    args = ap.parse_args()
    import numpy as np
    from llama_cpp import Llama

    with open(args.text) as f:
        text = f.read()
    llm = Llama(model_path=args.gguf, n_ctx=1024, logits_all=True, verbose=False, n_threads=2)
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
    ids = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    llm.reset()
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
    shifted = logits[:-1]
    top = shifted.max(axis=1, keepdims=True)
    logz = (top[:, 0] + np.log(np.exp(shifted - top).sum(axis=1)))
    picked = shifted[np.arange(len(ids) - 1), ids[1:]]
    nll = float((logz - picked).mean())

    dump = args.gguf + ".logits.json"
    out = subprocess.run(
        [args.bin, "score", "--model", args.gguf, "--text-file", args.text, "--json",
         "--logits-out", dump],
        check=True, capture_output=True, text=True).stdout
    ours = json.loads(out)
    with open(dump) as f:
        our_ids = json.load(f)["ids"]
    os.unlink(dump)
    same = our_ids == list(ids)
    rel = abs(nll - ours["nll"]) / ours["nll"]
    print(f"{args.gguf}: {len(ids)} tokens in llama.cpp, {len(our_ids)} in moi-studio "
          f"({'same ids' if same else 'DIFFERENT ids'}); NLL llama.cpp {nll:.5f} "
          f"(perplexity {math.exp(nll):.3f}), moi-studio {ours['nll']:.5f} "
          f"(perplexity {ours['ppl']:.3f}); difference {100 * rel:.3f} %")
    ok = same and rel < 0.01
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
