#!/usr/bin/env python3
"""Parity of `moi-studio export-recipe` with our own trainer: for each attention layout, export the
recipe of a small copy of presets/benchmarks.moi.toml (built-in tiny model), run one step of our
trainer and one step of the recipe's train.py (transformers + accelerate, CPU), and check that the
two step-1 losses agree within 0.5 %. Later steps (--steps) are compared too, which tests the
optimizer, learning-rate schedule and clipping. The isolated recipe is also trained over two CPU
processes, with torchrun (DDP) and with the recipe's accelerate FSDP config, whose losses must
equal the single process's.

Usage: python scripts/check_recipe.py [--bin target/release/moi-studio] [--steps 5] [--json]
Where this Python lacks torch, transformers and accelerate, the script makes the bench virtualenv
(~/.cache/moi-bench-venv), installs them there from PyPI and runs itself in it.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (attention, loss normalisation, LoRA). With LoRA, B starts at zero, so step 1 is the base
# model's loss in both; later steps differ, as the two draw A from different random streams.
CASES = [
    ("full", "token_mean", False),
    ("isolated", "token_mean", False),
    ("chunk", "sample_mean", False),
    ("chunk", "token_mean", True),
]


def project_copy(dest, attention, loss_norm, lora=False):
    """The benchmark project with absolute data paths, short rows and one layout."""
    with open(os.path.join(ROOT, "presets", "benchmarks.moi.toml")) as f:
        text = f.read()
    text = text.replace('path = "../', 'path = "' + ROOT + "/")
    text = re.sub(r'(?m)^attention = "\w+"', f'attention = "{attention}"', text)
    text = re.sub(r'(?m)^loss_norm = "\w+"', f'loss_norm = "{loss_norm}"', text)
    text = re.sub(r"(?m)^max_seq_len = \d+", "max_seq_len = 512", text)
    text = re.sub(r"(?m)^batch_rows = \d+", "batch_rows = 2\ngrad_accum = 2", text)
    text = re.sub(r"(?m)^eval_items = \d+", "eval_items = 4", text)
    text = re.sub(r"(?m)^eval_generate = \d+", "eval_generate = 1", text)
    text = re.sub(r"(?m)^max_new_tokens = \d+", "max_new_tokens = 8", text)
    if lora:
        # No dropout, so that step 1 is deterministic in both trainers.
        text = re.sub(r"(?m)^enabled = false", "enabled = true", text)
        text = re.sub(r"(?m)^dropout = [\d.]+", "dropout = 0.0", text)
    path = os.path.join(dest, f"{attention}{'-lora' if lora else ''}.moi.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def events(stdout):
    out = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


VENV = os.path.expanduser("~/.cache/moi-bench-venv")
NEEDS = ["torch", "transformers", "accelerate", "pyarrow", "peft", "trl", "datasets"]


def ensure_packages():
    """Re-runs this script in the bench virtualenv, making it first, when this Python lacks
    what train.py needs."""
    try:
        import accelerate, pyarrow, torch, transformers  # noqa: F401
        return
    except ImportError:
        pass
    python = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        raise SystemExit(f"{VENV} lacks packages; run {python} -m pip install " + " ".join(NEEDS))
    if not os.path.exists(python):
        print(f"making {VENV} (torch, transformers, accelerate, ...)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    subprocess.run([python, "-m", "pip", "install", "--quiet", *NEEDS], check=True)
    os.execv(python, [python, *sys.argv])


def main():
    ensure_packages()
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/moi-studio"))
    ap.add_argument("--steps", type=int, default=5, help="train.py steps after the parity step")
    ap.add_argument("--base-steps", type=int, default=60,
                    help="steps our trainer trains the starting model for")
    ap.add_argument("--processes", type=int, default=2,
                    help="also train the isolated recipe over this many CPU processes (DDP and "
                         "FSDP); 1 = skip")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # A freshly initialised model barely looks at its context (its loss is ln(vocab) whatever
        # the mask), so both trainers start from a model our trainer has trained a little: then
        # full and isolated attention give clearly different losses and the check can fail.
        base_project = project_copy(tmp, "full", "token_mean")
        base_runs = os.path.join(tmp, "runs-base")
        subprocess.run([args.bin, "train", base_project, "--steps", str(args.base_steps), "--cpu",
                        "--out", base_runs], check=True, capture_output=True)
        model = os.path.join(base_runs, os.listdir(base_runs)[0], "model")
        for attention, norm, lora in CASES:
            project = project_copy(tmp, attention, norm, lora)
            name = attention + ("-lora" if lora else "")
            recipe = os.path.join(tmp, f"recipe-{name}")
            subprocess.run([args.bin, "export-recipe", project, "--out", recipe, "--model", model],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            runs = os.path.join(tmp, f"runs-{name}")
            ours = subprocess.run(
                [args.bin, "train", project, "--model", model, "--steps", str(max(args.steps, 1)),
                 "--json", "--cpu", "--out", runs],
                check=True, capture_output=True, text=True)
            our_losses = [e["loss"] for e in events(ours.stdout) if e.get("event") == "step"]
            our_loss = our_losses[0]
            out = os.path.join(tmp, f"out-{name}")
            theirs = subprocess.run(
                [sys.executable, os.path.join(recipe, "train.py"), "--output", out,
                 "--max-steps", str(max(args.steps, 1)), "--no-save", "--eval-every", "0",
                 "--threads", "2"],
                check=True, capture_output=True, text=True)
            steps = [e for e in events(theirs.stdout) if e.get("event") == "step"]
            evals = [e for e in events(theirs.stdout) if e.get("event") == "eval"]
            their_loss = steps[0]["loss"]
            rel = abs(their_loss - our_loss) / our_loss
            spread = {}
            if args.processes > 1 and not lora and attention == "isolated":
                # The same steps over several processes: DDP (torchrun, gloo on CPU) and the
                # recipe's FSDP config must give the single process's losses.
                bindir = os.path.dirname(sys.executable)
                launchers = {
                    "ddp": [os.path.join(bindir, "torchrun"), f"--nproc_per_node={args.processes}"],
                    "fsdp": [os.path.join(bindir, "accelerate"), "launch", "--config_file",
                             os.path.join(recipe, "accelerate", "fsdp.yaml"),
                             "--num_processes", str(args.processes)],
                }
                for kind, launcher in launchers.items():
                    multi = subprocess.run(
                        [*launcher, os.path.join(recipe, "train.py"), "--output",
                         out + "-" + kind, "--max-steps", str(max(args.steps, 1)), "--no-save",
                         "--no-eval", "--threads", "1"],
                        check=True, capture_output=True, text=True)
                    started = next(e for e in events(multi.stdout) if e.get("event") == "started")
                    assert started["processes"] == args.processes, (kind, started)
                    losses = [e["loss"] for e in events(multi.stdout) if e.get("event") == "step"]
                    spread[kind] = max(abs(a - b["loss"]) / b["loss"] for a, b in zip(losses, steps))
                    assert len(losses) == len(steps), (kind, losses)
            results.append({
                "attention": attention, "loss_norm": norm, "lora": lora, "ours_step1": our_loss,
                "train_py_step1": their_loss, "relative_difference": rel,
                "train_py_losses": [s["loss"] for s in steps], "our_losses": our_losses,
                # Later steps also test the optimizer, schedule and clipping (not held to 0.5 %).
                "later_steps_largest_difference": None if lora else max(
                    [abs(a - s["loss"]) / a for a, s in zip(our_losses[1:], steps[1:])] or [0.0]),
                "eval_rows": len(evals), "ok": rel < 0.005 and all(v < 1e-5 for v in spread.values()),
                "processes": args.processes if spread else 1,
                "multi_process_largest_difference": spread,
            })
    # The layouts must matter for the check to mean anything.
    full = results[0]["ours_step1"]
    for r in results[1:]:
        if r["lora"]:
            continue
        r["differs_from_full"] = abs(r["ours_step1"] - full) / full
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['attention']:>8} {r['loss_norm']:>11}{' LoRA' if r['lora'] else ''}: ours {r['ours_step1']:.6f}  "
                  f"train.py {r['train_py_step1']:.6f}  difference {100 * r['relative_difference']:.4f} %  "
                  f"{'OK' if r['ok'] else 'MISMATCH'}; train.py losses "
                  + ", ".join(f"{x:.3f}" for x in r["train_py_losses"])
                  + f" (ours " + ", ".join(f"{x:.3f}" for x in r["our_losses"])
                  + (f"; later steps differ by {100 * r['later_steps_largest_difference']:.3f} % at most)"
                     if r["later_steps_largest_difference"] is not None else "; LoRA: A drawn differently)")
                  + f"; {r['eval_rows']} eval rows"
                  + (f"; {100 * r['differs_from_full']:.2f} % from full attention"
                     if "differs_from_full" in r else "")
                  + "".join(f"; {r['processes']} processes, {k}: losses differ by {100 * v:.5f} % at most"
                            for k, v in r["multi_process_largest_difference"].items()))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
