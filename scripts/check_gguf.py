#!/usr/bin/env python3
"""Checks a GGUF file written by `moi-studio export --gguf` with llama.cpp's own Python reader
(PyPI `gguf`): the metadata llama.cpp needs is there, and every tensor, dequantized by `gguf`,
equals the Hugging Face model it was written from (Q/K rows put back from llama.cpp's order)
within the weight type's error.

Usage: python scripts/check_gguf.py FILE.gguf MODEL_DIR [--json]
Needs: pip install gguf safetensors numpy
"""
import argparse
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import load_file

NEEDED = [
    "general.architecture", "llama.context_length", "llama.embedding_length", "llama.block_count",
    "llama.feed_forward_length", "llama.attention.head_count", "llama.attention.head_count_kv",
    "llama.rope.freq_base", "llama.attention.layer_norm_rms_epsilon", "tokenizer.ggml.model",
    "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.chat_template",
]
# Largest error per weight type, relative to the tensor's largest magnitude.
TOLERANCE = {"F32": 1e-7, "F16": 1e-3, "Q8_0": 1e-2, "Q4_0": 0.15}


def hf_name(name):
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    _, layer, rest = name.split(".", 2)
    mapped = {
        "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }[rest]
    return f"model.layers.{layer}.{mapped}"


def unpermute(w, heads):
    out, inp = w.shape
    return w.reshape(heads, out // heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def field_value(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("model_dir")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    reader = GGUFReader(args.gguf)
    missing = [k for k in NEEDED if k not in reader.fields]
    heads = int(field_value(reader, "llama.attention.head_count"))
    kv_heads = int(field_value(reader, "llama.attention.head_count_kv"))
    hf = load_file(f"{args.model_dir}/model.safetensors")
    report = {"file": args.gguf, "missing_metadata": missing, "tensors": 0, "worst": {}, "ok": not missing}
    for t in reader.tensors:
        want = hf[hf_name(t.name)].astype(np.float32)
        got = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(want.shape)
        if t.name.endswith("attn_q.weight"):
            got = unpermute(got, heads)
        elif t.name.endswith("attn_k.weight"):
            got = unpermute(got, kv_heads)
        kind = t.tensor_type.name
        err = float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-12))
        report["tensors"] += 1
        report["worst"][kind] = max(report["worst"].get(kind, 0.0), err)
        if err > TOLERANCE.get(kind, 0.0):
            report["ok"] = False
    report["architecture"] = str(field_value(reader, "general.architecture"))
    report["tokens"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    report["chat_template_chars"] = len(str(field_value(reader, "tokenizer.chat_template")))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.gguf}: {report['architecture']}, {report['tensors']} tensors, "
              f"{report['tokens']} tokens, chat template {report['chat_template_chars']} chars; "
              f"missing metadata: {missing or 'none'}; largest relative error by type: "
              + ", ".join(f"{k} {v:.2e}" for k, v in report["worst"].items())
              + ("; OK" if report["ok"] else "; MISMATCH"))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
