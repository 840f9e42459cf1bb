//! Writing a model as a llama.cpp GGUF file (llama architecture, f16/q8_0/q4_0 weights, the
//! byte-level BPE tokenizer and the chat template in the metadata) and an Ollama `Modelfile`
//! beside it.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;

use crate::core::fsutil::set_readable;
use crate::train::score::ModelBundle;

/// The weight type of an exported GGUF.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Quant {
    /// Half precision (lossless enough to compare logits tightly).
    #[default]
    F16,
    /// 8-bit blocks of 32 with one scale each.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit blocks of 32 with one scale each.
    #[value(name = "q4_0")]
    Q4_0,
}

impl Quant {
    /// The name used in file names and messages.
    pub fn label(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    fn dtype(self) -> GgmlDType {
        match self {
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// llama.cpp's `general.file_type` for a file mostly of this type.
    fn file_type(self) -> u32 {
        match self {
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4_0 => 2,
        }
    }
}

/// The GGUF name of a Hugging Face weight name (the inverse of the loader's mapping).
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, name) = rest.split_once('.')?;
    let mapped = match name {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// llama.cpp's Q/K row order for its interleaved rotary: rows `[head, 2, pair]` become
/// `[head, pair, 2]`.
fn permute(w: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / heads / 2;
    w.reshape((heads, 2, half, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// The llama.cpp pre-tokenizer name of a tokenizer, read from its serialised form.
fn pre_tokenizer_name(json: &Json) -> anyhow::Result<&'static str> {
    let pre = &json["pre_tokenizer"];
    let kind = |v: &Json| v["type"].as_str().unwrap_or("").to_string();
    let parts: Vec<&Json> = match kind(pre).as_str() {
        "Sequence" => pre["pretokenizers"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        "" => bail!("the tokenizer has no pre-tokenizer; only byte-level BPE tokenizers export"),
        _ => vec![pre],
    };
    let kinds: Vec<String> = parts.iter().map(|p| kind(p)).collect();
    let regex = parts
        .iter()
        .find(|p| kind(p) == "Split")
        .and_then(|p| p["pattern"]["Regex"].as_str())
        .unwrap_or("");
    Ok(
        match kinds.iter().map(String::as_str).collect::<Vec<_>>()[..] {
            ["ByteLevel"] => "gpt2",
            ["Digits", "ByteLevel"] => "smollm",
            ["Split", "ByteLevel"] if regex.contains(r"\p{N}{1,3}") => "llama-bpe",
            ["Split", "ByteLevel"] if regex.contains(r"\p{N}|") => "qwen2",
            _ => bail!(
                "pre-tokenizer {kinds:?} has no llama.cpp name this export knows (gpt2, smollm, \
             llama-bpe, qwen2)"
            ),
        },
    )
}

/// The tokenizer metadata: vocabulary, token types, merges and special ids.
fn tokenizer_metadata(bundle: &ModelBundle) -> anyhow::Result<Vec<(String, Value)>> {
    let text = bundle
        .tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("serialising the tokenizer: {e}"))?;
    let json: Json = serde_json::from_str(&text)?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "only byte-level BPE tokenizers export to GGUF; this one is {}",
            model["type"]
        );
    }
    let size = bundle.tokenizer.get_vocab_size(true);
    let mut tokens = vec![String::new(); size];
    for (tok, id) in bundle.tokenizer.get_vocab(true) {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = tok;
        }
    }
    if let Some(hole) = tokens.iter().position(String::is_empty) {
        bail!("token id {hole} has no text; the vocabulary has holes");
    }
    let special: std::collections::HashSet<u32> = bundle
        .tokenizer
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect();
    // Control tokens (3) for special added tokens, normal (1) otherwise.
    let types: Vec<Value> = (0..size as u32)
        .map(|id| Value::I32(if special.contains(&id) { 3 } else { 1 }))
        .collect();
    let merges: Vec<Value> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|pair| match pair {
                    Json::String(s) => Some(s.clone()),
                    Json::Array(ab) => Some(format!(
                        "{} {}",
                        ab.first()?.as_str()?,
                        ab.get(1)?.as_str()?
                    )),
                    _ => None,
                })
                .map(Value::String)
                .collect()
        })
        .unwrap_or_default();
    let config = &bundle.loaded.config;
    let mut meta = vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.pre".into(),
            Value::String(pre_tokenizer_name(&json)?.into()),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(merges)),
    ];
    let template = bundle.template()?;
    let id_of = |text: &str| bundle.tokenizer.token_to_id(text);
    let bos = config.bos_token_id.or_else(|| {
        (!template.bos_token.is_empty())
            .then(|| id_of(&template.bos_token))
            .flatten()
    });
    let eos = id_of(&crate::train::worker::eos_of(&template));
    if let Some(b) = bos {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(e) = eos {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    // Whether text gets a BOS first: as the model's own tokenizer does it.
    let add_bos = match bos {
        Some(b) => bundle.encode("a")?.first() == Some(&b),
        None => false,
    };
    meta.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    meta.push((
        "tokenizer.chat_template".into(),
        Value::String(template.source.clone()),
    ));
    Ok(meta)
}

/// Writes `bundle` as a GGUF file at `path` (atomically) with weights of type `quant`; norms
/// stay f32, as llama.cpp keeps them.
pub fn write_gguf(
    bundle: &ModelBundle,
    name: &str,
    quant: Quant,
    path: &Path,
) -> anyhow::Result<()> {
    let config = &bundle.loaded.config;
    if config.model_type != "llama" {
        bail!(
            "only llama-architecture models export to GGUF here; this one is {}",
            config.model_type
        );
    }
    if let Some(rope) = &config.llama3_rope
        && (rope.low_freq_factor != 1.0 || rope.high_freq_factor != 4.0)
    {
        bail!(
            "Llama 3 rotary scaling with frequency factors {} and {} is not written to GGUF              (llama.cpp's files carry 1 and 4)",
            rope.low_freq_factor,
            rope.high_freq_factor
        );
    }
    if config.attention_bias {
        bail!("attention biases are not written to GGUF yet");
    }
    let heads = config.num_attention_heads;
    let kv_heads = config.num_key_value_heads.unwrap_or(heads);
    let head_dim = config.head_size();
    if head_dim * heads != config.hidden_size {
        bail!(
            "heads of {head_dim} values that do not make up the hidden size {} are not written \
             to GGUF yet",
            config.hidden_size
        );
    }
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    for (key, value) in [
        ("context_length", config.max_position_embeddings),
        ("embedding_length", config.hidden_size),
        ("block_count", config.num_hidden_layers),
        ("feed_forward_length", config.intermediate_size),
        ("attention.head_count", heads),
        ("attention.head_count_kv", kv_heads),
        ("rope.dimension_count", head_dim),
        ("vocab_size", config.vocab_size),
    ] {
        meta.push((format!("llama.{key}"), Value::U32(value as u32)));
    }
    meta.push((
        "llama.rope.freq_base".into(),
        Value::F32(config.rope_theta as f32),
    ));
    meta.push((
        "llama.attention.layer_norm_rms_epsilon".into(),
        Value::F32(config.rms_norm_eps as f32),
    ));
    if let Some(rope) = &config.llama3_rope {
        meta.push((
            "llama.rope.scaling.original_context_length".into(),
            Value::U32(rope.original_max_position_embeddings as u32),
        ));
    }
    meta.extend(tokenizer_metadata(bundle)?);

    let data = bundle
        .loaded
        .weights
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("weight map lock poisoned"))?
        .clone();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::with_capacity(names.len());
    for hf in names {
        let Some(name) = gguf_name(hf) else {
            continue;
        };
        if name == "output.weight" && config.tie_word_embeddings {
            continue;
        }
        let mut t = data[hf]
            .as_tensor()
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        if name.ends_with("attn_q.weight") {
            t = permute(&t, heads)?;
        } else if name.ends_with("attn_k.weight") {
            t = permute(&t, kv_heads)?;
        }
        // Norms stay f32; a matrix whose rows do not split into whole blocks falls back to
        // f16, as llama.cpp's own quantizer does.
        let dtype = if t.rank() == 1 {
            GgmlDType::F32
        } else if t
            .dims()
            .last()
            .is_some_and(|&n| n % quant.dtype().block_size() != 0)
        {
            GgmlDType::F16
        } else {
            quant.dtype()
        };
        let q = QTensor::quantize(&t, dtype)
            .with_context(|| format!("quantizing {hf} to {}", quant.label()))?;
        tensors.push((name, q));
    }
    if let Some(rope) = &config.llama3_rope {
        let divisors = rope_divisors(rope, config.rope_theta, head_dim);
        let n = divisors.len();
        let t = Tensor::from_vec(divisors, n, &Device::Cpu)?;
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::Builder::new()
        .prefix(".moi-gguf-")
        .tempfile_in(dir)?;
    {
        let mut out = std::io::BufWriter::new(tmp.as_file().try_clone()?);
        let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensor_refs: Vec<(&str, &QTensor)> =
            tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        candle_core::quantized::gguf_file::write(&mut out, &meta_refs, &tensor_refs)?;
        use std::io::Write;
        out.flush()?;
    }
    tmp.as_file().sync_all()?;
    set_readable(tmp.path())?;
    tmp.persist(path)
        .map_err(|e| anyhow::anyhow!("writing {}: {}", path.display(), e.error))?;
    Ok(())
}

/// llama.cpp's `rope_freqs.weight` for Llama 3.1-style scaling: for each rotary frequency, what
/// the plain inverse frequency is divided by.
fn rope_divisors(rope: &crate::train::config::Llama3Rope, theta: f64, dims: usize) -> Vec<f32> {
    (0..dims / 2)
        .map(|i| {
            let inv_freq = theta.powf(-((2 * i) as f64) / dims as f64);
            (inv_freq / rope.scale(inv_freq)) as f32
        })
        .collect()
}

/// The chat template as an Ollama (Go) template, for the families it can be read from; `None`
/// for others (Ollama then needs one written by hand).
pub fn ollama_template(src: &str) -> Option<(String, Vec<String>)> {
    if src.contains("<|im_start|>") {
        return Some((
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}\
             <|im_start|>assistant\n"
                .to_string(),
            vec!["<|im_end|>".to_string()],
        ));
    }
    if src.contains("<|start_header_id|>") {
        return Some((
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n\
             {{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
                .to_string(),
            vec!["<|eot_id|>".to_string()],
        ));
    }
    if src.contains("<start_of_turn>") {
        return Some((
            "{{- range .Messages }}<start_of_turn>{{ if eq .Role \"assistant\" }}model\
             {{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}\
             <start_of_turn>model\n"
                .to_string(),
            vec!["<end_of_turn>".to_string()],
        ));
    }
    None
}

/// An Ollama `Modelfile` for `gguf_file` (a name beside it): the template translated, the
/// default system prompt, stop tokens and greedy decoding as the studio evaluates.
pub fn modelfile(gguf_file: &str, template_source: &str, system: &str) -> String {
    let quote = |s: &str| s.replace('"', "\\\"");
    let mut text = format!(
        "# Written by MoI Studio. Create the model with: ollama create NAME -f Modelfile\n\
         FROM ./{gguf_file}\n"
    );
    match ollama_template(template_source) {
        Some((tmpl, stops)) => {
            text.push_str(&format!("TEMPLATE \"\"\"{tmpl}\"\"\"\n"));
            for s in stops {
                text.push_str(&format!("PARAMETER stop \"{}\"\n", quote(&s)));
            }
        }
        None => text.push_str(
            "# The chat template is not one MoI Studio can translate to Ollama's; Ollama reads \
             tokenizer.chat_template from the GGUF where it recognises it, else write TEMPLATE \
             here.\n",
        ),
    }
    text.push_str(&format!("SYSTEM \"\"\"{system}\"\"\"\n"));
    text.push_str("PARAMETER temperature 0\n");
    text
}

/// What [`export_run_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    /// The GGUF file.
    pub gguf: std::path::PathBuf,
    /// The Ollama Modelfile beside it.
    pub modelfile: std::path::PathBuf,
    /// Whether the Modelfile carries a translated template.
    pub template_translated: bool,
}

/// Writes a run's finished model (merged, for LoRA runs) as `out/model.QUANT.gguf` with an
/// Ollama `Modelfile` whose system prompt is the run's project's default one.
pub fn export_run_gguf(run: &Path, out: &Path, quant: Quant) -> anyhow::Result<GgufExport> {
    let model = run.join("model");
    if !model.join("config.json").is_file() {
        return Err(crate::train::export::NoModel {
            run: run.to_path_buf(),
            missing: model.join("config.json"),
        }
        .into());
    }
    let bundle = crate::train::score::load_bundle(&model, &Device::Cpu)
        .with_context(|| format!("loading {}", model.display()))?;
    let system = crate::core::project::Project::load(&run.join("project.moi.toml"))
        .map(|p| p.default_system_prompt)
        .unwrap_or_else(|_| "You are a helpful assistant.".to_string());
    let name = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "moi-studio".to_string());
    let file = format!("model.{}.gguf", quant.label());
    let gguf = out.join(&file);
    write_gguf(&bundle, &name, quant, &gguf)?;
    let source = bundle.template()?.source;
    let modelfile_path = out.join("Modelfile");
    crate::core::fsutil::write_atomic(
        &modelfile_path,
        modelfile(&file, &source, &system).as_bytes(),
    )?;
    Ok(GgufExport {
        gguf,
        modelfile: modelfile_path,
        template_translated: ollama_template(&source).is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::template::ChatTemplate;

    #[test]
    fn gguf_names_invert_the_loaders_mapping() {
        for hf in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
            "model.layers.7.self_attn.k_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.2.post_attention_layernorm.weight",
        ] {
            let g = gguf_name(hf).unwrap();
            assert_eq!(crate::train::gguf::hf_name(&g).as_deref(), Some(hf), "{g}");
        }
        assert_eq!(gguf_name("model.rotary_emb.inv_freq"), None);
    }

    #[test]
    fn permute_is_undone_by_the_loader() {
        let w = Tensor::arange(0f32, 48.0, &Device::Cpu)
            .unwrap()
            .reshape((12, 4))
            .unwrap();
        let back = crate::train::gguf::unpermute(&permute(&w, 2).unwrap(), 2).unwrap();
        assert_eq!(
            back.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn chatml_translates_to_an_ollama_template() {
        let chatml = ChatTemplate::chatml();
        let file = modelfile(
            "model.q8_0.gguf",
            &chatml.source,
            "You are a \"helpful\" assistant.",
        );
        assert!(file.contains("FROM ./model.q8_0.gguf"));
        assert!(file.contains("<|im_start|>{{ .Role }}"));
        assert!(file.contains("PARAMETER stop \"<|im_end|>\""));
        assert!(file.contains("SYSTEM \"\"\"You are a \"helpful\" assistant.\"\"\""));
        let untranslated = modelfile("m.gguf", "{{ messages }}", "x");
        assert!(!untranslated.lines().any(|l| l.starts_with("TEMPLATE")));
        assert!(untranslated.contains("FROM ./m.gguf"));
        let llama3 = ChatTemplate::llama3();
        assert!(modelfile("m.gguf", &llama3.source, "x").contains("<|eot_id|>"));
    }
}
