//! Model-side code (candle): device choice, the trainable decoder (full or LoRA), loading and
//! exporting Hugging Face models, the training loop, per-task evaluation and the worker thread.

pub mod ablate;
pub mod batch;
pub mod chat;
pub mod config;
pub mod device;
pub mod eval;
pub mod export;
pub mod gguf;
pub mod gguf_export;
pub mod kernels;
pub mod load;
pub mod memory;
pub mod model;
pub mod optim;
pub mod phased;
pub mod process;
pub mod recipe;
pub mod score;
pub mod tiny;
pub mod trainer;
pub mod vexp;
pub mod worker;
