//! Loading a Hugging Face model folder: `config.json` and `model.safetensors` (or shards listed
//! in `model.safetensors.index.json`), into trainable weights.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::train::config::{ConfigError, ModelConfig};
use crate::train::model::{Decoder, weight_shapes};

/// Why a model folder could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file the folder needs is not there.
    #[error("missing {what} ({})", path.display())]
    Missing { what: String, path: PathBuf },
    /// The config is unreadable or unsupported.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A weights file is not valid safetensors (truncated, or another format).
    #[error("cannot read weights: {why} ({})", path.display())]
    Safetensors { path: PathBuf, why: String },
    /// The shard index is not valid.
    #[error("bad shard index: {why} ({})", path.display())]
    Index { path: PathBuf, why: String },
    /// A tensor the config calls for is in no weights file.
    #[error("tensor \"{name}\" is missing from the weights ({})", files.join(", "))]
    MissingTensor { name: String, files: Vec<String> },
    /// A tensor has a shape the config does not allow.
    #[error(
        "tensor \"{name}\" has shape {found:?} but the config needs {expected:?} ({})",
        path.display()
    )]
    Shape {
        name: String,
        path: PathBuf,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    /// Building the model failed.
    #[error("cannot build the model: {0}")]
    Build(String),
    /// The weights would not fit in the memory available.
    #[error("{0}")]
    Memory(String),
}

/// A model read from disk, its weights trainable.
pub struct LoadedModel {
    /// The decoder.
    pub model: Decoder,
    /// Its weights, by Hugging Face name.
    pub weights: VarMap,
    /// Its configuration.
    pub config: ModelConfig,
}

/// The weight files of a model folder, in order.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(LoadError::Missing {
            what: "model.safetensors (or model.safetensors.index.json)".to_string(),
            path: dir.to_path_buf(),
        });
    }
    let bad = |why: String| LoadError::Index {
        path: index.clone(),
        why,
    };
    let text = std::fs::read_to_string(&index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("it has no \"weight_map\" object".to_string()))?;
    let files: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let path = dir.join(f);
        if !path.is_file() {
            return Err(LoadError::Missing {
                what: format!("shard {f} listed in the index"),
                path,
            });
        }
        out.push(path);
    }
    Ok(out)
}

/// The tensors of one safetensors file held in memory, on the CPU; `path` is only used in
/// messages.
pub fn read_safetensors(bytes: &[u8], path: &Path) -> Result<HashMap<String, Tensor>, LoadError> {
    candle_core::safetensors::load_buffer(bytes, &Device::Cpu).map_err(|e| LoadError::Safetensors {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// The parameters a config's weights hold.
pub fn parameter_count(config: &ModelConfig) -> u64 {
    weight_shapes(config)
        .iter()
        .map(|(_, shape)| shape.iter().product::<usize>() as u64)
        .sum()
}

/// Loads a Hugging Face model folder onto `device` as trainable f32 weights.
pub fn load_hf_folder(dir: &Path, device: &Device) -> Result<LoadedModel, LoadError> {
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(LoadError::Missing {
            what: "config.json".to_string(),
            path: dir.to_path_buf(),
        });
    }
    let config = ModelConfig::load(&config_path)?;
    let files = weight_files(dir)?;
    let expected: HashMap<String, Vec<usize>> = weight_shapes(&config).into_iter().collect();
    // Each file is read whole, and its tensors are kept in the file's type until every file is
    // read: about the files' size again beside the f32 weights.
    let file_bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    crate::train::memory::check_load_fits(
        dir,
        parameter_count(&config),
        device.is_cpu(),
        2 * file_bytes,
    )
    .map_err(LoadError::Memory)?;
    let mut found: HashMap<String, Tensor> = HashMap::with_capacity(expected.len());
    for path in &files {
        let bytes = std::fs::read(path).map_err(|e| LoadError::Safetensors {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let tensors = read_safetensors(&bytes, path)?;
        for (name, tensor) in tensors {
            let Some(shape) = expected.get(&name) else {
                continue;
            };
            if tensor.dims() != shape.as_slice() {
                return Err(LoadError::Shape {
                    name,
                    path: path.clone(),
                    found: tensor.dims().to_vec(),
                    expected: shape.clone(),
                });
            }
            found.insert(name, tensor);
        }
    }
    let weights = VarMap::new();
    {
        let mut data = weights
            .data()
            .lock()
            .map_err(|_| LoadError::Build("weight map lock poisoned".to_string()))?;
        for (name, _) in weight_shapes(&config) {
            let Some(tensor) = found.remove(&name) else {
                return Err(LoadError::MissingTensor {
                    name,
                    files: files.iter().map(|p| p.display().to_string()).collect(),
                });
            };
            let tensor = tensor
                .to_dtype(DType::F32)
                .and_then(|t| t.to_device(device))
                .map_err(|e| LoadError::Build(e.to_string()))?;
            let var = Var::from_tensor(&tensor).map_err(|e| LoadError::Build(e.to_string()))?;
            data.insert(name, var);
        }
    }
    let vb = VarBuilder::from_varmap(&weights, DType::F32, device);
    let model = Decoder::new(&config, vb).map_err(|e| LoadError::Build(e.to_string()))?;
    Ok(LoadedModel {
        model,
        weights,
        config,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::{attention_mask, new_trainable};
    use candle_core::IndexOp;

    fn cfg() -> ModelConfig {
        ModelConfig {
            vocab_size: 40,
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: Some(1),
            max_position_embeddings: 32,
            ..ModelConfig::tiny(40)
        }
    }

    fn save(dir: &Path, varmap: &VarMap, config: &ModelConfig) -> HashMap<String, Tensor> {
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string(config).unwrap(),
        )
        .unwrap();
        let tensors: HashMap<String, Tensor> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
        tensors
    }

    fn logits(m: &Decoder) -> Vec<f32> {
        let dev = Device::Cpu;
        let ids = Tensor::new(&[[1u32, 7, 3, 9]], &dev).unwrap();
        let pos = Tensor::new(&[[0u32, 1, 2, 3]], &dev).unwrap();
        let mask = attention_mask(&[vec![0; 4]], 4, &dev).unwrap();
        m.forward(&ids, &pos, &mask)
            .unwrap()
            .i(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn a_saved_folder_loads_to_the_same_model() {
        let dir = tempfile::tempdir().unwrap();
        let (model, varmap) = new_trainable(&cfg(), 5, &Device::Cpu).unwrap();
        save(dir.path(), &varmap, &cfg());
        let loaded = load_hf_folder(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(logits(&model), logits(&loaded.model));
    }

    #[test]
    fn sharded_weights_load_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (model, varmap) = new_trainable(&cfg(), 6, &Device::Cpu).unwrap();
        let tensors = save(dir.path(), &varmap, &cfg());
        std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
        let (a, b): (Vec<_>, Vec<_>) = tensors
            .into_iter()
            .partition(|(k, _)| k.contains("layers.0"));
        let a: HashMap<_, _> = a.into_iter().collect();
        let b: HashMap<_, _> = b.into_iter().collect();
        candle_core::safetensors::save(&a, dir.path().join("part-1.safetensors")).unwrap();
        candle_core::safetensors::save(&b, dir.path().join("part-2.safetensors")).unwrap();
        let map: serde_json::Map<String, serde_json::Value> = a
            .keys()
            .map(|k| (k.clone(), "part-1.safetensors".into()))
            .chain(b.keys().map(|k| (k.clone(), "part-2.safetensors".into())))
            .collect();
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            serde_json::json!({ "weight_map": map }).to_string(),
        )
        .unwrap();
        let loaded = load_hf_folder(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(logits(&model), logits(&loaded.model));
    }

    #[test]
    fn a_model_too_big_for_memory_is_refused_with_the_numbers_before_its_weights_are_read() {
        let dir = tempfile::tempdir().unwrap();
        // A 405-billion-parameter shape: 1.6 TB as f32, beyond any machine this runs on.
        let config = ModelConfig {
            vocab_size: 128_256,
            hidden_size: 16_384,
            intermediate_size: 53_248,
            num_hidden_layers: 126,
            num_attention_heads: 128,
            num_key_value_heads: Some(8),
            max_position_embeddings: 4096,
            ..ModelConfig::tiny(128_256)
        };
        std::fs::write(
            dir.path().join("config.json"),
            serde_json::to_string(&config).unwrap(),
        )
        .unwrap();
        // Not safetensors at all: reading it would fail with another message.
        std::fs::write(dir.path().join("model.safetensors"), b"not weights").unwrap();
        let err = load_hf_folder(dir.path(), &Device::Cpu).err().unwrap();
        let LoadError::Memory(text) = &err else {
            panic!("expected a memory refusal, got {err}");
        };
        assert!(parameter_count(&config) > 400_000_000_000);
        for part in [
            "needs about",
            "billion parameters as f32",
            "GiB of memory is available",
        ] {
            assert!(text.contains(part), "{part:?} not in {text}");
        }
        assert!(text.contains(&dir.path().display().to_string()), "{text}");
        // The small model beside it loads (the check does not refuse what fits).
        let small = tempfile::tempdir().unwrap();
        let (_, varmap) = new_trainable(&cfg(), 7, &Device::Cpu).unwrap();
        save(small.path(), &varmap, &cfg());
        assert!(load_hf_folder(small.path(), &Device::Cpu).is_ok());
    }

    #[test]
    fn bad_folders_name_the_file_and_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_hf_folder(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing config.json"), "{err}");

        let (_, varmap) = new_trainable(&cfg(), 7, &Device::Cpu).unwrap();
        let mut tensors = save(dir.path(), &varmap, &cfg());
        let weights = dir.path().join("model.safetensors");
        let bytes = std::fs::read(&weights).unwrap();
        std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
        let err = load_hf_folder(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("cannot read weights") && err.contains("model.safetensors"),
            "{err}"
        );

        tensors.remove("model.layers.1.mlp.up_proj.weight");
        candle_core::safetensors::save(&tensors, &weights).unwrap();
        let err = load_hf_folder(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("\"model.layers.1.mlp.up_proj.weight\" is missing"),
            "{err}"
        );

        tensors.insert(
            "model.layers.1.mlp.up_proj.weight".to_string(),
            Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, &weights).unwrap();
        let err = load_hf_folder(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("has shape [3, 3] but the config needs [32, 16]"),
            "{err}"
        );
    }
}
