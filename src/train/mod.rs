//! Model-side code (candle): device choice, the trainable decoder and its configuration. The
//! trainer and evaluation come with the trainer issue.

pub mod batch;
pub mod config;
pub mod device;
pub mod export;
pub mod gguf;
pub mod load;
pub mod model;
pub mod optim;
pub mod score;
pub mod tiny;
pub mod trainer;
pub mod worker;
