//! The progress bar on stderr (a line every 5 s when stderr is not a terminal).

use crate::sys::{self, now_ns};

use super::SEC;

/// Progress of one step, drawn from the workers' reports.
pub(crate) struct Progress {
    name: String,
    tty: bool,
    quiet: bool,
    t0: u64,
    last_line: u64,
    drawn: bool,
}

impl Progress {
    pub(crate) fn new(name: &str, quiet: bool) -> Self {
        Progress {
            name: name.to_owned(),
            tty: sys::stderr_is_tty(),
            quiet,
            t0: now_ns(),
            last_line: now_ns(),
            drawn: false,
        }
    }

    pub(crate) fn draw(&mut self, done: u64, total: u64) {
        if self.quiet {
            return;
        }
        let secs = (now_ns() - self.t0) as f64 / 1e9;
        let frac = if total > 0 {
            (done as f64 / total as f64).min(1.0)
        } else {
            0.0
        };
        if self.tty {
            let w = 30usize;
            let fill = (frac * w as f64) as usize;
            eprint!(
                "\r{:<10} [{}{}] {:>9}/{:<9} {:>6.1}s",
                self.name,
                "#".repeat(fill),
                ".".repeat(w - fill),
                done,
                total,
                secs
            );
            self.drawn = true;
        } else if now_ns() - self.last_line > 5 * SEC {
            self.last_line = now_ns();
            eprintln!(
                "{}: {done}/{total} ({:.0}%) {secs:.1}s",
                self.name,
                frac * 100.0
            );
        }
    }

    pub(crate) fn finish(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}
