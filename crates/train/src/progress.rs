//! How long runs report. The library says what happened; the caller renders it (the `chorus`
//! binary draws a bar on a terminal and prints lines otherwise).

/// Receives a run's progress. Every method has an empty default.
pub trait Progress {
    /// A phase of `total` units begins (`train` in steps, `scoring train` in rows) at `done`.
    fn begin(&mut self, _phase: &str, _total: u64, _done: u64) {}
    /// `done` units are finished; `status` summarises the latest metrics (empty: none new).
    fn update(&mut self, _done: u64, _status: &str) {}
    /// A line worth keeping: what is trained, validation results, checkpoints, stops.
    fn line(&mut self, _text: &str) {}
    /// The phase ended (`completed = false`: stopped early by an error).
    fn end(&mut self, _completed: bool) {}
}

/// Reports nothing (tests, library use without a display).
#[derive(Debug, Default, Clone, Copy)]
pub struct Silent;

impl Progress for Silent {}
