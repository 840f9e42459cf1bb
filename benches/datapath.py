"""Python reference for the end-to-end data-path benchmark (`cargo bench --bench datapath`).

Does with Hugging Face tools what `moi-studio pack` does: read the task files (alpaca JSONL),
turn each record into chat messages under its task's system prompt, render them with the
tokenizer's own chat template (`apply_chat_template`), tokenize, mask the prompt out of the
labels (as TRL does for prompt/completion data), pack with TRL's best-fit-decreasing
`pack_dataset`, and write parquet. Prints one JSON object: seconds per phase, rows, peak RSS.

Run by the bench; by hand:
    ~/.cache/moi-bench-venv/bin/python benches/datapath.py --tokenizer DIR --out DIR \
        --task "You are a mathematician.=math.jsonl" ...
Needs datasets, transformers and trl (~/.cache/moi-bench-venv/bin/pip install datasets trl).
"""
import argparse
import json
import os
import resource
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="folder with tokenizer.json and its config")
    p.add_argument("--task", action="append", required=True, help="SYSTEM_PROMPT=FILE.jsonl")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import datasets
    from transformers import AutoTokenizer
    from trl.data_utils import pack_dataset

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    times = {}
    t0 = time.perf_counter()
    parts = []
    for spec in a.task:
        system, path = spec.rsplit("=", 1)
        ds = datasets.load_dataset("json", data_files=path, split="train")
        ds = ds.add_column("system", [system] * len(ds))
        parts.append(ds)
    ds = datasets.concatenate_datasets(parts)
    times["read"] = time.perf_counter() - t0

    def encode(batch):
        ids, labels = [], []
        for system, instruction, output in zip(batch["system"], batch["instruction"],
                                               batch["output"]):
            prompt = [{"role": "system", "content": system},
                      {"role": "user", "content": instruction}]
            full = prompt + [{"role": "assistant", "content": output}]
            p_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            f_text = tok.apply_chat_template(full, tokenize=False)
            p_ids = tok(p_text, add_special_tokens=False)["input_ids"]
            f_ids = tok(f_text, add_special_tokens=False)["input_ids"]
            ids.append(f_ids)
            labels.append([-100] * len(p_ids) + f_ids[len(p_ids):])
        return {"input_ids": ids, "labels": labels}

    t0 = time.perf_counter()
    ds = ds.map(encode, batched=True, batch_size=1000, num_proc=a.procs,
                remove_columns=ds.column_names)
    times["template_tokenize_label"] = time.perf_counter() - t0
    records = len(ds)

    t0 = time.perf_counter()
    packed = pack_dataset(ds, a.seq, strategy="bfd")
    times["pack"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    packed.to_parquet(os.path.join(a.out, "train.parquet"))
    times["write"] = time.perf_counter() - t0

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({
        "records": records, "rows": len(packed), "seconds": sum(times.values()),
        "phases": times, "peak_rss_mib": max(own, kids) / 1024.0,
        "peak_rss_mib_main": own / 1024.0, "peak_rss_mib_workers": kids / 1024.0,
    }))


if __name__ == "__main__":
    main()
