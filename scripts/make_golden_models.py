#!/usr/bin/env python3
"""Make tiny random models with Python transformers and record their logits, so the Rust decoder
can be checked against an independent implementation.

  python3 scripts/make_golden_models.py      # needs torch, transformers, safetensors

Writes tests/data/golden/<name>/{config.json, model.safetensors, logits.json} for a Qwen2-style
model (q/k/v bias, tied embeddings, GQA), a Llama-style model (no bias, untied head) and a
Llama 3.1-style one (rotary scaling).
"""

import json
import pathlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "golden"
PROMPTS = [[1, 5, 9, 13, 2, 7], [3, 3, 3, 100, 101, 102, 103, 4], [42]]


def build(name, config_cls, model_cls, **kw):
    torch.manual_seed(1234)
    config = config_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                        rms_norm_eps=1e-6, **kw)
    model = model_cls(config).eval()
    # Random init leaves norms at one; perturb them so the test sees their weights too.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    out = OUT / name
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    logits = []
    with torch.no_grad():
        for ids in PROMPTS:
            logits.append(model(torch.tensor([ids])).logits[0].tolist())
    (out / "logits.json").write_text(json.dumps({"prompts": PROMPTS, "logits": logits}))
    (out / "generation_config.json").unlink(missing_ok=True)
    print(name, sum(p.numel() for p in model.parameters()), "parameters")


build("qwen2", Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=True, rope_theta=1000000.0)
build("llama", LlamaConfig, LlamaForCausalLM, tie_word_embeddings=False, rope_theta=10000.0)
# Llama 3.1-style rotary scaling (context stretched 8x from 16 positions, so it matters here).
build("llama3", LlamaConfig, LlamaForCausalLM, tie_word_embeddings=False,
      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
