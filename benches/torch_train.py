"""PyTorch reference for the training-throughput benchmark of the built-in tiny model.

Measures training tokens/s (forward, backward, grad clip, AdamW step, zero_grad) of the
tiny llama in ../presets/tiny_model.json with transformers' LlamaForCausalLM on CPU in
float32, using the same workload as the Rust/candle trainer: `rows` x `seq` random token
ids packed into ~`segment`-token segments with a block-diagonal causal additive mask
[b,1,t,t], position ids 0..t-1, labels = inputs. It is the comparison point for
`cargo bench --bench train`.

`cargo bench --bench train` runs it beside ours. By hand (from the repository root):
    ~/.cache/moi-bench-venv/bin/python benches/torch_train.py            # 2 warmup + 10 steps
    ~/.cache/moi-bench-venv/bin/python benches/torch_train.py --attn sdpa --json
    ~/.cache/moi-bench-venv/bin/python benches/torch_train.py --gguf GGUF --rows 1  # SmolLM2 LoRA
Needs torch, transformers, peft and gguf (python3 -m venv ~/.cache/moi-bench-venv &&
~/.cache/moi-bench-venv/bin/pip install torch transformers peft gguf).
"""
import argparse
import json
import os
import resource
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def block_causal_mask(rows, seq, segment):
    """Additive float mask [rows,1,seq,seq]: 0 where a token may attend (earlier or same
    position within its own packed segment), a large negative value elsewhere."""
    seg_id = torch.arange(seq) // segment
    same = seg_id[:, None] == seg_id[None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = same & causal
    mask = torch.zeros(seq, seq, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask.expand(rows, 1, seq, seq).contiguous()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=4099, help="vocab size (tokenizer + 3 specials)")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--segment", type=int, default=128, help="packed segment length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.add_argument("--gguf", help="train this GGUF model (SmolLM2) with LoRA r 8 on q,k,v,o via "
                   "PEFT instead of the tiny model")
    p.add_argument("--checkpointing", action="store_true",
                   help="gradient (activation) checkpointing per layer, non-reentrant")
    a = p.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.gguf:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        folder, name = os.path.split(os.path.abspath(a.gguf))
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, torch_dtype=torch.float32, attn_implementation=a.attn)
        a.vocab = model.config.vocab_size
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        model = get_peft_model(model, lora).train()
        if a.checkpointing:
            # The embedding is frozen: without this the checkpointed blocks see an input that
            # needs no gradient and PEFT's adapters would get none.
            model.enable_input_require_grads()
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "..", "presets", "tiny_model.json")) as f:
            cfg = json.load(f)
        cfg.pop("model_type", None)
        cfg["vocab_size"] = a.vocab
        config = LlamaConfig(**cfg, attn_implementation=a.attn)
        model = LlamaForCausalLM(config).float().train()
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    ids = torch.randint(0, a.vocab, (a.rows, a.seq))
    mask = block_causal_mask(a.rows, a.seq, a.segment)
    pos = torch.arange(a.seq).unsqueeze(0).expand(a.rows, a.seq)

    def step():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=ids)
        loss = out.loss
        if not torch.isfinite(loss):
            raise SystemExit(f"non-finite loss: {loss.item()}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(a.warmup):
        t0 = time.perf_counter()
        loss = step()
        print(f"warmup {i + 1}/{a.warmup}: loss {loss:.4f}, {time.perf_counter() - t0:.3f} s")
    total = 0.0
    losses = []
    for i in range(a.steps):
        t0 = time.perf_counter()
        loss = step()
        dt = time.perf_counter() - t0
        total += dt
        losses.append(loss)
        print(f"step {i + 1}/{a.steps}: loss {loss:.4f}, {dt:.3f} s")
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    tokens = a.rows * a.seq * a.steps
    tps = tokens / total if total > 0 else float("nan")
    sps = total / a.steps if a.steps else float("nan")
    if a.json:
        print(json.dumps({
            "torch": torch.__version__, "transformers": transformers.__version__,
            "steps": a.steps, "rows": a.rows, "seq": a.seq, "segment": a.segment,
            "vocab": a.vocab, "tokens_per_s": tps, "s_per_step": sps,
            "threads": a.threads, "attn": a.attn, "peak_rss_mib": peak_rss_mib,
            "checkpointing": a.checkpointing,
            "first_loss": losses[0] if losses else float("nan"),
            "last_loss": losses[-1] if losses else float("nan"),
        }))
    else:
        print(f"torch {torch.__version__} transformers {transformers.__version__}: "
              f"{a.steps} steps, {a.rows}x{a.seq} rows, {tps:.0f} tokens/s "
              f"({sps:.3f} s/step), threads {a.threads}, attn {a.attn}")


if __name__ == "__main__":
    main()
