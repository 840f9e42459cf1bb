//! Pure logic: records and import, tasks and the project file. No GUI and no model code lives
//! here, so everything can be tested without a window or a tensor library.

pub mod ablation;
pub mod bpe;
pub mod chains;
pub mod dataset;
pub mod eval;
pub mod events;
pub mod figure;
pub mod fsutil;
pub mod import;
pub mod metrics;
pub mod mixing;
pub mod packing;
pub mod phases;
pub mod presets;
pub mod project;
pub mod record;
pub mod runs;
pub mod sampling;
pub mod settings;
pub mod sit;
pub mod spill;
pub mod split;
pub mod synth;
pub mod template;
pub mod tokenize;
pub mod train_settings;
pub mod views;
