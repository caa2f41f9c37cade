//! Human-readable rendering of a [`Report`].

use std::fmt::Write as _;

use crate::capacity::{human_bytes, thousands, ChangeKind, Report, Status};

fn status_word(s: Status) -> &'static str {
    match s {
        Status::Ok => "OK",
        Status::Warn => "WARN",
        Status::Fail => "FAIL",
        Status::Info => "info",
    }
}

fn kind_word(k: ChangeKind) -> &'static str {
    match k {
        ChangeKind::Sysctl => "sysctl",
        ChangeKind::Rlimit => "rlimit",
        ChangeKind::Firewall => "firewall",
        ChangeKind::Gateway => "gateway",
        ChangeKind::Host => "host",
    }
}

/// Renders the report as the text table `switchboard-preflight` prints.
pub fn render_text(rep: &Report) -> String {
    let r = &rep.readings;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Switchboard preflight: kernel {}, {} cores, MemTotal {}, MemAvailable {}, page {} B",
        r.kernel_release,
        r.online_cores,
        human_bytes(r.mem_total_bytes),
        human_bytes(r.mem_available_bytes),
        r.page_size
    );
    let _ = writeln!(o, "Target: {} connections", thousands(rep.target));
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "CAPACITY: connections one gateway process can hold, per limiting factor"
    );

    let name_w = rep
        .factors
        .iter()
        .map(|f| f.name.chars().count())
        .max()
        .unwrap_or(0)
        .max("FACTOR".len());
    let cur_w = rep
        .factors
        .iter()
        .map(|f| f.current.chars().count())
        .max()
        .unwrap_or(0)
        .max("CURRENT".len());
    let allow_w = rep
        .factors
        .iter()
        .map(|f| thousands(f.allows).len())
        .max()
        .unwrap_or(0)
        .max("ALLOWS".len());
    let _ = writeln!(
        o,
        "  {:<name_w$}  {:<cur_w$}  {:>allow_w$}  TARGET",
        "FACTOR", "CURRENT", "ALLOWS"
    );
    for f in &rep.factors {
        let _ = writeln!(
            o,
            "  {:<name_w$}  {:<cur_w$}  {:>allow_w$}  {}{}",
            f.name,
            f.current,
            thousands(f.allows),
            if f.meets_target { "ok" } else { "SHORT" },
            if f.binding { "   <== BINDS FIRST" } else { "" }
        );
        let _ = writeln!(o, "      {}", f.explain);
    }
    let _ = writeln!(o);
    if let Some(b) = rep.factors.iter().find(|f| f.binding) {
        let _ = writeln!(
            o,
            "Binding limit: {} -> {} connections as configured.",
            b.name,
            thousands(rep.max_connections)
        );
    }
    let _ = writeln!(
        o,
        "Target {}: {}",
        thousands(rep.target),
        if rep.target_reachable {
            "REACHABLE as configured (exit 0)."
        } else {
            "NOT reachable as configured (exit 1)."
        }
    );
    let _ = writeln!(o);

    let _ = writeln!(o, "CHECKS");
    let cname_w = rep
        .checks
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0);
    for c in &rep.checks {
        let _ = writeln!(
            o,
            "  {:<4}  {:<cname_w$}  {}",
            status_word(c.status),
            c.name,
            c.current
        );
        let _ = writeln!(o, "      {}", c.explain);
        if c.status == Status::Info {
            for ch in &c.changes {
                let _ = writeln!(o, "      advice: {}", ch.action);
                let _ = writeln!(o, "              ({})", ch.reason);
            }
        }
    }
    let _ = writeln!(o);

    if rep.changes.is_empty() {
        let _ = writeln!(
            o,
            "CHANGES: none needed for {} connections.",
            thousands(rep.target)
        );
    } else {
        let _ = writeln!(
            o,
            "CHANGES needed for {} connections (apply in this order):",
            thousands(rep.target)
        );
        for (i, c) in rep.changes.iter().enumerate() {
            let _ = writeln!(o, "  {:>2}. [{}] {}", i + 1, kind_word(c.kind), c.action);
            let _ = writeln!(o, "      why: {}", c.reason);
        }
    }
    let _ = writeln!(o);
    let _ = writeln!(o, "NOTES");
    for n in &rep.notes {
        let _ = writeln!(o, "  - {n}");
    }
    o
}
