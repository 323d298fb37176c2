//! Process-wide settings of candle's CPU backend, made by a binary before any thread starts.

/// Runs candle's element-wise CPU ops on the calling thread: sets `CANDLE_NUM_THREADS=1` unless
/// the user set it. candle 0.11 spreads element-wise ops (the gradient additions of every
/// backward pass among them) over a pool of its own whose threads spin for a while after each
/// op; beside rayon's pool, which runs the matrix products and this crate's fused ops, they take
/// cores those need: a training step with 2 threads ran 1.2–1.25× faster without them (docs/
/// PERFORMANCE.md). Call it at the start of `main`, before any other thread exists (changing
/// the environment is only sound then).
pub fn elementwise_on_caller() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
