//! Renders chorus-train's progress: a bar on stderr when it is a terminal, plain lines otherwise
//! (logs, `cargo xtask train`).

use chorus_train::Progress;
use indicatif::{ProgressBar, ProgressStyle};

/// The bar of the current phase (none between phases).
#[derive(Default)]
pub struct Bar {
    bar: Option<ProgressBar>,
    total: u64,
}

impl Progress for Bar {
    fn begin(&mut self, phase: &str, total: u64, done: u64) {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} ETA {eta} {msg}",
            )
            .expect("valid template"),
        );
        bar.set_prefix(phase.to_string());
        bar.set_position(done);
        self.bar = Some(bar);
        self.total = total;
    }

    fn update(&mut self, done: u64, status: &str) {
        let Some(bar) = &self.bar else { return };
        bar.set_position(done);
        if !status.is_empty() {
            bar.set_message(status.to_string());
            if bar.is_hidden() {
                eprintln!("step {done}/{}: {status}", self.total);
            }
        }
    }

    fn line(&mut self, text: &str) {
        match &self.bar {
            Some(bar) if !bar.is_hidden() => bar.println(text),
            _ => eprintln!("{text}"),
        }
    }

    fn end(&mut self, completed: bool) {
        if let Some(bar) = self.bar.take() {
            if completed {
                bar.finish();
            } else {
                bar.abandon();
            }
        }
    }
}

/// The progress of one evaluation inside a run's overall bar: its `done` is added to the units the
/// run finished before it (`finished`, advanced when the phase ends), and its own phase is not shown.
pub struct Offset<'a> {
    outer: &'a mut dyn Progress,
    finished: &'a mut u64,
    done: u64,
}

impl<'a> Offset<'a> {
    pub fn new(outer: &'a mut dyn Progress, finished: &'a mut u64) -> Self {
        Self {
            outer,
            finished,
            done: 0,
        }
    }
}

impl Progress for Offset<'_> {
    fn update(&mut self, done: u64, status: &str) {
        self.done = done;
        self.outer.update(*self.finished + done, status);
    }

    fn line(&mut self, text: &str) {
        self.outer.line(text);
    }

    fn end(&mut self, _completed: bool) {
        *self.finished += self.done;
        self.done = 0;
    }
}
