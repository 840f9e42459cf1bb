//! The fuzz smoke run: every fuzz target (`moi_studio::fuzzing`) over its seed corpus, every crash
//! input the fuzzer ever found (`fuzz/regressions/`), and a fixed number of seeded mutations of
//! the seeds. The long runs are `scripts/fuzz` (cargo-fuzz, libFuzzer); see RELIABILITY.md.

use std::path::{Path, PathBuf};

use moi_studio::fuzzing::{TARGETS, run};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

mod common;

/// Mutated inputs tried per target in the smoke run.
const MUTATIONS: usize = 1500;

fn fuzz_dir() -> PathBuf {
    common::root().join("fuzz")
}

/// The files in `dir`, sorted, or none when it does not exist.
fn inputs_in(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// One random change of the kinds libFuzzer makes: flip, overwrite, insert, delete, repeat,
/// truncate, or splice in part of another seed.
fn mutate(rng: &mut ChaCha8Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    let rounds = rng.random_range(1..=4);
    for _ in 0..rounds {
        let len = out.len();
        match rng.random_range(0..7) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                out[i] = *[0u8, 0xff, b'"', b'{', b'[', b'\n', b',', 0x7f, b'}']
                    .get(rng.random_range(0..9))
                    .unwrap();
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                out.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 64));
                out.drain(a..b);
            }
            4 if len > 0 => {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a..=len.min(a + 32));
                let chunk = out[a..b].to_vec();
                for _ in 0..rng.random_range(1..8) {
                    out.splice(b..b, chunk.iter().copied());
                }
            }
            5 if len > 0 => out.truncate(rng.random_range(0..len)),
            _ if !other.is_empty() => {
                let a = rng.random_range(0..other.len());
                let b = rng.random_range(a..=other.len());
                let at = rng.random_range(0..=out.len());
                out.splice(at..at, other[a..b].iter().copied());
            }
            _ => {}
        }
    }
    out
}

fn smoke(target: &str) {
    let seeds = inputs_in(&fuzz_dir().join("seeds").join(target));
    assert!(
        !seeds.is_empty(),
        "fuzz/seeds/{target} holds no seeds; run `cargo test --test fuzz_smoke -- --ignored`"
    );
    let mut taken = 0;
    for (path, bytes) in &seeds {
        eprintln!("{target}: seed {}", path.display());
        taken += usize::from(run(target, bytes));
    }
    // Seeds that are all refused would fuzz only the error paths.
    assert!(taken >= 1, "{target}: no seed is taken by its parser");
    for (path, bytes) in inputs_in(&fuzz_dir().join("regressions").join(target)) {
        eprintln!("{target}: regression {}", path.display());
        run(target, &bytes);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed ^ target.len() as u64);
    for i in 0..MUTATIONS {
        let a = &seeds[rng.random_range(0..seeds.len())].1;
        let b = &seeds[rng.random_range(0..seeds.len())].1;
        let input = mutate(&mut rng, a, b);
        let shown = std::panic::AssertUnwindSafe(|| run(target, &input));
        if std::panic::catch_unwind(shown).is_err() {
            let keep = std::env::temp_dir().join(format!("moi-fuzz-smoke-{target}-{i}"));
            std::fs::write(&keep, &input).unwrap();
            panic!(
                "{target} panicked on mutation {i}; the input is in {} (add it to \
                 fuzz/regressions/{target}/ once fixed)",
                keep.display()
            );
        }
    }
}

macro_rules! smoke_tests {
    ($($name:ident),*) => {
        $(#[test]
        fn $name() {
            smoke(stringify!($name));
        })*

        #[test]
        fn every_target_has_a_smoke_test_and_a_cargo_fuzz_target() {
            let tested = [$(stringify!($name)),*];
            assert_eq!(tested.as_slice(), TARGETS.as_slice());
            for target in TARGETS {
                let file = fuzz_dir().join("fuzz_targets").join(format!("{target}.rs"));
                let text = std::fs::read_to_string(&file)
                    .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                assert!(text.contains(&format!("run(\"{target}\"")), "{}", file.display());
            }
        }
    };
}

smoke_tests!(
    import_jsonl,
    import_json,
    import_csv,
    import_parquet,
    import_gzip,
    column_mapping,
    chat_template,
    project_file,
    gguf_header,
    safetensors_header,
    metrics_reload
);

/// Writes `fuzz/seeds/`: the seed corpus of every target, from `tests/data`, the presets and
/// small files made here (parquet, gzip, GGUF, safetensors, metrics). Run by hand when the seeds
/// should change: `cargo test --test fuzz_smoke -- --ignored write_fuzz_seeds`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let root = common::root();
    let data = root.join("tests/data");
    let seeds = fuzz_dir().join("seeds");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = seeds.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    };
    let files_ending = |ends: &[&str]| -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .filter(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                ends.iter().any(|e| n.ends_with(e))
            })
            .map(|p| {
                let n = p.file_name().unwrap().to_string_lossy().into_owned();
                (n, std::fs::read(&p).unwrap())
            })
            .collect();
        out.sort();
        out
    };
    let _ = std::fs::remove_dir_all(&seeds);

    let alpaca = br#"{"instruction":"Add 2 and 3.","input":"","output":"5"}
{"conversations":[{"from":"system","value":"Be brief."},{"from":"human","value":"Hi"},{"from":"gpt","value":"Hello!"}]}
{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello"}]}
{"prompt":"Say yes.","completion":"yes"}
"#;
    put("import_jsonl", "formats.jsonl", alpaca);
    for (name, bytes) in files_ending(&[".jsonl"]) {
        put("import_jsonl", &name, &bytes);
    }

    put(
        "import_json",
        "array.json",
        br#"[{"instruction":"a","output":"b"},{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"r"}]}]"#,
    );
    put(
        "import_json",
        "object.json",
        br#"{"data":[{"prompt":"p","completion":"c"}]}"#,
    );
    for (name, bytes) in files_ending(&[".json"])
        .into_iter()
        .filter(|(n, _)| n != "smollm2_reference.json")
    {
        put("import_json", &name, &bytes);
    }

    for (name, bytes) in files_ending(&[".csv", ".tsv"]) {
        put("import_csv", &name, &bytes);
    }
    put(
        "import_csv",
        "quoted.csv",
        b"instruction,input,output\n\"Say \"\"hi\"\"\",,\"hi\nthere\"\nx,y,z\n",
    );

    put(
        "import_parquet",
        "alpaca.parquet",
        &common::parquet_bytes(false),
    );
    put(
        "import_parquet",
        "sharegpt.parquet",
        &common::parquet_bytes(true),
    );

    let mut compressed = vec![0u8];
    compressed.extend_from_slice(alpaca);
    put("import_gzip", "plain.bin", &compressed);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, alpaca).unwrap();
    let gz = gz.finish().unwrap();
    let mut raw = vec![1u8];
    raw.extend_from_slice(&gz[2..]);
    put("import_gzip", "raw.bin", &raw);

    let mappings: [&[u8]; 4] = [
        br#"user=q;assistant=a
{"q":"hi","a":"yo"}"#,
        br#"system=s;user=u;assistant=a;input=ctx
{"s":"Be kind.","u":"Help","ctx":"me","a":"Sure"}"#,
        br#"messages=conv
{"conv":[{"role":"user","content":"q"},{"role":"assistant","content":"r"}]}"#,
        br#"
{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"r"}]}"#,
    ];
    for (i, m) in mappings.iter().enumerate() {
        put("column_mapping", &format!("mapping{i}.txt"), m);
    }

    let conversation: &[u8] =
        b"\x00You are a helpful assistant.\x01\x01What is 2+2?\x01\x024\x01\x01Thanks\x01\x02You're welcome.";
    let mut templates = 0;
    for (name, bytes) in std::fs::read_dir(data.join("templates"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("_tokenizer_config.json"))
        .map(|p| {
            let n = p.file_stem().unwrap().to_string_lossy().into_owned();
            (n, std::fs::read(&p).unwrap())
        })
    {
        let config: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let source = match &config["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .unwrap_or_default()
                .to_string(),
            _ => continue,
        };
        let mut seed = source.into_bytes();
        seed.push(0);
        seed.extend_from_slice(conversation);
        put("chat_template", &format!("{name}.bin"), &seed);
        templates += 1;
    }
    assert!(templates >= 5);

    for entry in std::fs::read_dir(root.join("presets")).unwrap() {
        let p = entry.unwrap().path();
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        if n.ends_with(".toml") {
            put("project_file", &n, &std::fs::read(&p).unwrap());
        }
    }

    put("gguf_header", "tokenizer.gguf", &gguf_bytes());

    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("w.safetensors");
    let a = candle_core::Tensor::arange(0f32, 6., &candle_core::Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let b = candle_core::Tensor::new(&[1u8, 2, 3], &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("a.weight".to_string(), a), ("b".to_string(), b)]),
        &st,
    )
    .unwrap();
    put(
        "safetensors_header",
        "two.safetensors",
        &std::fs::read(&st).unwrap(),
    );

    let metrics = r#"{"event":"started","device":"cpu","device_reason":"no GPU","parameters":100,"trainable":100,"total_steps":4,"kernels":"fused"}
{"event":"step","step":1,"epoch":0.25,"loss":2.5,"lr":0.001,"grad_norm":1.0,"tokens_per_sec":100.0,"elapsed_s":1.0,"tokens_seen":64,"steps":1,"task_loss":[{"task":"math","loss":2.4,"tokens":32}]}
{"event":"step","step":2,"epoch":0.5,"loss":2.0,"lr":0.001,"grad_norm":1.0,"tokens_per_sec":100.0,"elapsed_s":2.0,"tokens_seen":128,"steps":1}
{"event":"eval","step":2,"task":"math","prompt":"default","loss":2.1,"perplexity":8.2,"accuracy":0.3,"exact_match":0.5,"items":4,"generated":2,"tokens":40,"sample":"42"}
{"event":"checkpoint","step":2,"path":"checkpoint-2"}
{"event":"log","message":"hello"}
{"event":"step","step":3,"epoch":0.75,"loss":1.5,"lr":0.001,"grad_norm":1.0,"tokens_per_sec":100.0,"elapsed_s":3.0,"tokens_seen":192,"steps":1}
{"event":"stopped","step":3}
{"event":"step","step":4,"epo"#;
    let mut seed = vec![2u8];
    seed.extend_from_slice(metrics.as_bytes());
    put("metrics_reload", "run.jsonl", &seed);

    for target in TARGETS {
        assert!(seeds.join(target).is_dir(), "no seeds written for {target}");
    }
}

/// A GGUF file with a byte-level BPE tokenizer, a chat template and no tensors.
fn gguf_bytes() -> Vec<u8> {
    use candle_core::quantized::gguf_file::{Value, write};
    let tokens: Vec<Value> = ["<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa"]
        .iter()
        .map(|t| Value::String(t.to_string()))
        .collect();
    let merges: Vec<Value> = ["a b", "Ġ a"]
        .iter()
        .map(|t| Value::String(t.to_string()))
        .collect();
    let types: Vec<Value> = [3i32, 3, 1, 1, 1, 1, 1]
        .iter()
        .map(|&t| Value::I32(t))
        .collect();
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.context_length", Value::U32(2048)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("smollm".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.merges", Value::Array(merges)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.bos_token_id", Value::U32(0)),
        ("tokenizer.ggml.eos_token_id", Value::U32(1)),
        (
            "tokenizer.chat_template",
            Value::String(
                "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}".into(),
            ),
        ),
    ];
    let refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let mut out = std::io::Cursor::new(Vec::new());
    write(&mut out, &refs, &[]).unwrap();
    out.into_inner()
}
