//! Model-side code (candle): device choice now; the model, trainer and evaluation come with the
//! model and trainer issues.

pub mod device;
