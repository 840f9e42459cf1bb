#!/usr/bin/env python3
"""Trains the MoI recipe in this folder (written by `moi-studio export-recipe`) with Hugging Face
transformers and accelerate, the way MoI Studio's own trainer does: the same rows in the same
steps, the same attention mask over instruction segments, the same loss normalisation, learning
rate schedule, AdamW and clipping, and per-task evaluation under each task's own system prompt
and under the default one.

    python train.py --output out                       # one process
    accelerate launch --config_file accelerate/ddp.yaml --num_processes 8 train.py --output out

Needs: torch, transformers, accelerate, pyarrow (and peft for LoRA recipes).
"""
import argparse
import json
import math
import os
import re
import time

import pyarrow.parquet as pq
import torch
from accelerate import Accelerator, PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=HERE, help="the recipe folder (default: this script's)")
    ap.add_argument("--output", default="out", help="where metrics.jsonl and the model go")
    ap.add_argument("--model", help="model to start from (default: recipe.json's)")
    ap.add_argument("--max-steps", type=int, help="stop after this many steps (default: all)")
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--eval-every", type=int, help="evaluate every N steps (default: recipe's; 0 = at the end)")
    ap.add_argument("--no-eval", action="store_true", help="skip evaluation")
    ap.add_argument("--no-save", action="store_true", help="do not write the trained model")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    return ap.parse_args()


def lr_at(step, r):
    """MoI Studio's schedule: linear warm-up, then cosine, linear or constant to a floor."""
    peak, warmup, total = r["lr"], r["warmup_steps"], r["steps"]
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(total - warmup, 1)
    progress = min(max((step - min(warmup, step)) / span, 0.0), 1.0)
    low = peak * r["min_lr_ratio"]
    if r["decay"] == "constant":
        return peak
    if r["decay"] == "linear":
        return peak - (peak - low) * progress
    return low + (peak - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


def read_steps(path):
    """The rows of train.parquet grouped by their `step`, in order."""
    table = pq.read_table(path)
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    steps = []
    for i, s in enumerate(cols["step"]):
        if s == len(steps):
            steps.append([])
        steps[s].append({k: cols[k][i] for k in cols})
    return steps


def attention_mask(segments, t, dtype, device):
    """The 4-D additive mask MoI Studio trains with: token i sees token j when j <= i and j is
    in segment 0 (the shared prefix) or in i's own segment; padding (-1) is never seen, and a
    padding query sees only itself so that its softmax stays finite."""
    seg = torch.full((len(segments), t), -1, dtype=torch.long)
    for r, s in enumerate(segments):
        seg[r, : len(s)] = torch.tensor(s, dtype=torch.long)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(t, t, dtype=torch.bool).tril()[None]
    allowed = causal & (k != -1) & ((k == 0) | (k == q))
    allowed |= (q == -1) & torch.eye(t, dtype=torch.bool)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(device)


def step_weights(rows, norm):
    """Each row's per-token loss weights (on the target positions 1..t-1), normalised over the
    whole step: per trained token, or per sample and then per sample count."""
    owners = []
    for r in rows:
        labels, samples = r["labels"], r["sample_ids"]
        owners.append([samples[j] if labels[j] >= 0 and samples[j] > 0 else 0 for j in range(1, len(labels))])
    trained = sum(1 for o in owners for s in o if s)
    counts = [{} for _ in rows]
    for c, o in zip(counts, owners):
        for s in o:
            if s:
                c[s] = c.get(s, 0) + 1
    samples = sum(len(c) for c in counts)
    weights = []
    for c, o in zip(counts, owners):
        if norm == "sample_mean":
            weights.append([1.0 / (c[s] * max(samples, 1)) if s else 0.0 for s in o])
        else:
            weights.append([1.0 / max(trained, 1) if s else 0.0 for s in o])
    return weights


def micro_batch(rows, weights, dtype, device, flash):
    t = max(len(r["input_ids"]) for r in rows)
    b = len(rows)
    ids = torch.zeros(b, t, dtype=torch.long)
    pos = torch.zeros(b, t, dtype=torch.long)
    targets = torch.zeros(b, t - 1, dtype=torch.long)
    w = torch.zeros(b, t - 1, dtype=torch.float32)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        pos[i, :n] = torch.tensor(r["position_ids"])
        targets[i, : n - 1] = torch.tensor([max(x, 0) for x in r["labels"][1:]])
        w[i, : n - 1] = torch.tensor(weights[i])
    batch = {"input_ids": ids.to(device), "position_ids": pos.to(device)}
    if not flash:
        batch["attention_mask"] = attention_mask([r["segment_ids"] for r in rows], t, dtype, device)
    return batch, targets.to(device), w.to(device)


def weighted_loss(model, batch, targets, weights):
    logits = model(**batch).logits[:, :-1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None])[..., 0]
    return -(logp * weights).sum()


# Answer checks, as MoI Studio's evaluation does them.
def _numbers(text):
    return [m.replace(",", "") for m in re.findall(r"-?\d(?:[\d]|,(?=\d))*(?:\.\d+)?", text)]


def math_answer(text):
    at = text.rfind("####")
    if at >= 0:
        found = _numbers(text[at + 4 :])
        if found:
            return found[0]
    found = _numbers(text)
    return found[-1] if found else None


def _normalize(v):
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, list):
        return [_normalize(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalize(x) for k, x in v.items()}
    return v


def _call_from(v):
    if isinstance(v, list):
        return _call_from(v[0]) if v else None
    if not isinstance(v, dict):
        return None
    if isinstance(v.get("function"), dict):
        return _call_from(v["function"])
    if not isinstance(v.get("name"), str):
        return None
    args = v.get("arguments", v.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return (v["name"], _normalize(args))


def tool_call(text):
    decoder = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text[m.start() :])
        except ValueError:
            continue
        call = _call_from(value)
        if call is not None:
            return call
    return None


def passes(check, generated, reference):
    if check == "math":
        a, b = math_answer(generated), math_answer(reference)
        if a is None or b is None:
            return False
        try:
            x, y = float(a), float(b)
            return abs(x - y) <= 1e-9 * max(abs(x), abs(y), 1.0)
        except ValueError:
            return a == b
    if check == "tool":
        a, b = tool_call(generated), tool_call(reference)
        return a is not None and a == b
    if check == "exact":
        return " ".join(generated.split()) == " ".join(reference.split())
    return None


@torch.no_grad()
def evaluate(model, tokenizer, items, stop_ids, device, dtype):
    """Per task and prompt kind: mean loss on answer tokens, and exact match of greedy answers."""
    model.eval()
    out = {}
    for it in items:
        key = (it["task"], it["prompt"])
        acc = out.setdefault(key, {"loss": 0.0, "tokens": 0, "passed": 0, "tried": 0})
        ids = torch.tensor([it["input_ids"]], device=device)
        labels = torch.tensor(it["labels"][1:], device=device)
        logits = model(input_ids=ids).logits[0, :-1].float()
        keep = labels >= 0
        if keep.any():
            logp = torch.log_softmax(logits[keep], dim=-1).gather(-1, labels[keep][:, None])
            acc["loss"] -= logp.sum().item()
            acc["tokens"] += int(keep.sum())
        if it["generate"] and it["check"] != "none" and tokenizer is not None:
            prompt = list(it["prompt_ids"])
            answer = []
            for _ in range(it["max_new_tokens"]):
                logits = model(input_ids=torch.tensor([prompt + answer], device=device)).logits[0, -1]
                nxt = int(logits.argmax())
                if nxt in stop_ids:
                    break
                answer.append(nxt)
            text = tokenizer.decode(answer, skip_special_tokens=True)
            ok = passes(it["check"], text, it["reference"])
            acc["tried"] += 1
            acc["passed"] += int(bool(ok))
    model.train()
    rows = []
    for (task, prompt), a in sorted(out.items()):
        rows.append({
            "task": task,
            "prompt": prompt,
            "loss": a["loss"] / max(a["tokens"], 1),
            "exact_match": a["passed"] / a["tried"] if a["tried"] else None,
            "answered": a["tried"],
        })
    return rows


def main():
    args = parse_args()
    with open(os.path.join(args.recipe, "recipe.json")) as f:
        r = json.load(f)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(r["seed"])
    # Each process takes every world-th micro-batch of a step; a process with fewer micro-batches
    # than the others at an epoch's last step runs one with zero weights, so all stay in step.
    # Without an accelerator, several processes (torchrun, accelerate launch) train on CPUs.
    cpu = not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))
    world = PartialState(cpu=cpu).num_processes
    micro_per_rank = max(math.ceil(r["grad_accum"] / world), 1)
    accelerator = Accelerator(cpu=cpu, gradient_accumulation_steps=micro_per_rank)
    rank = accelerator.process_index
    device = accelerator.device
    dtype = getattr(torch, args.dtype)
    layout = r["packing"].get("attention", "full")
    flash = args.attn == "flash_attention_2"
    if flash and layout != "full":
        raise SystemExit(
            "FlashAttention cannot reproduce this recipe's mask (segments that share a prefix); "
            "use --attn sdpa or eager"
        )
    if flash and r["packing"].get("reset_position_ids"):
        # transformers' FlashAttention path starts a new sequence wherever positions restart,
        # which would hide earlier instructions that this recipe's full attention shows.
        raise SystemExit(
            "FlashAttention would split rows where positions restart, but this recipe attends "
            "across them; use --attn sdpa or eager"
        )
    model_path = args.model or r["model"]
    if not os.path.isabs(model_path) and os.path.isdir(os.path.join(args.recipe, model_path)):
        model_path = os.path.join(args.recipe, model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, attn_implementation=args.attn)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        tokenizer = None
    if r.get("lora"):
        from peft import LoraConfig, get_peft_model

        lo = r["lora"]
        model = get_peft_model(model, LoraConfig(
            r=lo["rank"], lora_alpha=lo["alpha"], lora_dropout=lo["dropout"],
            target_modules=lo["targets"], bias="none", task_type="CAUSAL_LM"))
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name.endswith(".bias") or "norm" in name else decay).append(p)
    a = r["adamw"]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": a["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=r["lr"], betas=(a["beta1"], a["beta2"]), eps=a["eps"])
    model, optimizer = accelerator.prepare(model, optimizer)

    steps = read_steps(os.path.join(args.recipe, "train.parquet"))
    total = min(len(steps), args.max_steps or len(steps))
    eval_items = []
    eval_path = os.path.join(args.recipe, "eval.parquet")
    if not args.no_eval and os.path.exists(eval_path):
        table = pq.read_table(eval_path)
        cols = {n: table.column(n).to_pylist() for n in table.column_names}
        eval_items = [{k: cols[k][i] for k in cols} for i in range(table.num_rows)]
    eval_every = r.get("eval_every_steps", 0) if args.eval_every is None else args.eval_every
    stop_ids = set(r.get("stop_token_ids", []))
    os.makedirs(args.output, exist_ok=True)
    log = open(os.path.join(args.output, "metrics.jsonl"), "a") if accelerator.is_main_process else None

    def record(obj):
        if log is not None:
            log.write(json.dumps(obj) + "\n")
            log.flush()
            print(json.dumps(obj), flush=True)

    record({"event": "started", "model": model_path, "steps": total, "processes": world,
            "attn": args.attn, "dtype": args.dtype})
    tokens = 0
    started = time.time()
    for step in range(total):
        rows = steps[step]
        weights = step_weights(rows, r["loss_norm"])
        b = r["batch_rows"]
        micros = [list(range(i, min(i + b, len(rows)))) for i in range(0, len(rows), b)]
        mine = micros[rank::world]
        lr = lr_at(step, r)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        norm = None
        for m in range(micro_per_rank):
            idx = mine[m] if m < len(mine) else micros[0]
            scale = 1.0 if m < len(mine) else 0.0
            batch, targets, w = micro_batch([rows[i] for i in idx], [weights[i] for i in idx], dtype, device, flash)
            with accelerator.accumulate(model):
                loss = weighted_loss(model, batch, targets, w * scale)
                # accelerate divides by the micro-batches per process and DDP averages over
                # processes; the weights already sum to one over the whole step.
                accelerator.backward(loss * micro_per_rank * world)
                loss_sum += loss.detach()
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(model.parameters(), r["clip_grad_norm"]) \
                        if r["clip_grad_norm"] > 0 else None
                    optimizer.step()
                    optimizer.zero_grad()
        step_loss = accelerator.reduce(loss_sum, reduction="sum").item()
        tokens += sum(len(row["input_ids"]) for row in rows)
        elapsed = time.time() - started
        record({"event": "step", "step": step + 1, "loss": step_loss, "lr": lr, "tokens": tokens,
                "grad_norm": float(norm) if norm is not None else None,
                "tokens_per_s": tokens / max(elapsed, 1e-9)})
        last = step + 1 == total
        if eval_items and ((eval_every and (step + 1) % eval_every == 0) or last):
            # Every process evaluates (sharded models need all of them for a forward pass); the
            # main one records.
            for row in evaluate(model, tokenizer, eval_items, stop_ids, device, dtype):
                record({"event": "eval", "step": step + 1, **row})
            accelerator.wait_for_everyone()
    if not args.no_save:
        accelerator.wait_for_everyone()
        unwrapped = accelerator.unwrap_model(model)
        target = os.path.join(args.output, "model")
        unwrapped.save_pretrained(target, is_main_process=accelerator.is_main_process,
                                  save_function=accelerator.save,
                                  state_dict=accelerator.get_state_dict(model))
        if tokenizer is not None and accelerator.is_main_process:
            tokenizer.save_pretrained(target)
    record({"event": "finished", "steps": total})


if __name__ == "__main__":
    main()
