//! Gathering runs into figures, and printing them as a table or JSON lines.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::cases::{Case, Outcome};
use crate::systems::System;

/// What happened to one (case, system) over all rounds.
#[derive(Debug, Default)]
pub(crate) struct Row {
    /// Every successful run.
    pub(crate) runs: Vec<Outcome>,
    /// Why the system cannot do the case.
    pub(crate) skipped: Option<String>,
    /// The last failure, if a run failed.
    pub(crate) error: Option<String>,
}

/// All rows, by case then system.
pub(crate) type Rows = BTreeMap<(Case, System), Row>;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

impl Row {
    /// The median over runs of each figure, in first-seen order.
    pub(crate) fn figures(&self) -> Vec<(&'static str, f64)> {
        let mut names: Vec<&'static str> = Vec::new();
        for run in &self.runs {
            for (name, _) in &run.figures {
                if !names.contains(name) {
                    names.push(name);
                }
            }
        }
        names
            .into_iter()
            .map(|name| {
                let values = self
                    .runs
                    .iter()
                    .filter_map(|r| r.figures.iter().find(|(n, _)| *n == name).map(|f| f.1))
                    .collect();
                (name, median(values))
            })
            .collect()
    }

    /// One figure's median.
    pub(crate) fn figure(&self, name: &str) -> Option<f64> {
        self.figures()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|f| f.1)
    }
}

/// flow-tcp's main figure divided by this system's (the issue's "flow is
/// N× the other" form: above 1 is better for flow in rates, below 1 in
/// times and bytes).
fn ratio_to_flow(rows: &Rows, case: Case, system: System) -> Option<f64> {
    let name = case.main_figure();
    let flow = rows.get(&(case, System::FlowTcp))?.figure(name)?;
    let this = rows.get(&(case, system))?.figure(name)?;
    let ratio = flow / this;
    ratio.is_finite().then_some(ratio)
}

fn round(value: f64) -> f64 {
    if value.abs() >= 100.0 {
        (value * 10.0).round() / 10.0
    } else {
        (value * 1000.0).round() / 1000.0
    }
}

/// The JSON object of one (case, system), `case` and `system` first.
pub(crate) fn json_line(rows: &Rows, case: Case, system: System) -> String {
    let mut fields: Vec<(String, Value)> = vec![
        ("case".into(), json!(case.name())),
        ("system".into(), json!(system.name())),
    ];
    if let Some(row) = rows.get(&(case, system)) {
        if let Some(reason) = &row.skipped {
            fields.push(("skipped".into(), json!(reason)));
        } else if row.runs.is_empty() {
            let error = row.error.clone().unwrap_or_else(|| "no run".into());
            fields.push(("error".into(), json!(error)));
        } else {
            for (name, value) in row.figures() {
                fields.push((name.into(), json!(round(value))));
            }
            if let Some(ratio) = ratio_to_flow(rows, case, system) {
                fields.push(("ratio_to_flow".into(), json!(round(ratio))));
            }
            fields.push(("runs".into(), json!(row.runs.len())));
            if let Some(last) = row.runs.last() {
                for (name, value) in &last.notes {
                    fields.push(((*name).into(), value.clone()));
                }
            }
            if let Some(error) = &row.error {
                fields.push(("error_in_some_run".into(), json!(error)));
            }
        }
    }
    let body: Vec<String> = fields
        .into_iter()
        .map(|(name, value)| format!("{}: {value}", Value::String(name)))
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// Prints one JSON object per line for every (case, system) run.
pub(crate) fn print_json(rows: &Rows) {
    for &(case, system) in rows.keys() {
        println!("{}", json_line(rows, case, system));
    }
}

/// Prints a table per case.
pub(crate) fn print_table(rows: &Rows) {
    let mut cases: Vec<Case> = rows.keys().map(|(c, _)| *c).collect();
    cases.dedup();
    for case in cases {
        println!("\n## {}", case.name());
        for (&(c, system), row) in rows.iter() {
            if c != case {
                continue;
            }
            let mut line = format!("  {:<12}", system.name());
            if let Some(reason) = &row.skipped {
                line.push_str(&format!(" skipped: {reason}"));
            } else if row.runs.is_empty() {
                line.push_str(&format!(
                    " failed: {}",
                    row.error.as_deref().unwrap_or("no run")
                ));
            } else {
                for (name, value) in row.figures() {
                    line.push_str(&format!(" {name}={}", round(value)));
                }
                if let Some(ratio) = ratio_to_flow(rows, case, system) {
                    line.push_str(&format!(" ratio_to_flow={}", round(ratio)));
                }
                line.push_str(&format!(" (runs {})", row.runs.len()));
            }
            println!("{line}");
        }
    }
}

fn fig(rows: &Rows, case: Case, system: System, name: &str) -> Option<f64> {
    rows.get(&(case, system))?.figure(name)
}

fn verdict(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "met",
        Some(false) => "NOT met",
        None => "not measured",
    }
}

/// Prints the targets of issue 3 and whether flow-tcp meets them.
pub(crate) fn print_targets(rows: &Rows) {
    use Case::*;
    use System::*;
    let flow = |case, name| fig(rows, case, FlowTcp, name);
    let other = |case, system, name| fig(rows, case, system, name);

    let throughput = (|| {
        let f = flow(Throughput, "mb_per_s")?;
        let noise = other(Throughput, YamuxNoise, "mb_per_s")?;
        let plain = other(Throughput, Yamux, "mb_per_s")?;
        Some((f >= 3.0 * noise && f > plain, f / noise, f / plain))
    })();
    let rtt = (|| {
        let f = flow(Rtt, "p50_us")?;
        let tcp = other(Rtt, Tcp, "p50_us")?;
        Some((f <= 1.2 * tcp, f / tcp))
    })();
    let loaded = (|| {
        let p99 = flow(RttUnderLoad, "p99_us")?;
        let share = flow(RttUnderLoad, "bulk_share_of_solo")?;
        Some((p99 <= 1000.0 && share >= 0.8, p99, share))
    })();
    // The rate of a connection busy opening flows (32 in flight), and the
    // rate of one opened at a time (a round trip each), both against
    // plain yamux.
    let open_ratio = |figure: &'static str| {
        let f = flow(Open, figure)?;
        let y = other(Open, Yamux, figure)?;
        Some((f >= 2.0 * y, f / y))
    };
    let open = open_ratio("parallel_per_s");
    let open_one = open_ratio("per_s");
    let memory = flow(IdleMemory, "bytes_per_stream").map(|b| (b <= 1024.0, b));
    let handshake = (|| {
        let f = flow(Handshake, "per_s")?;
        let noise = other(Handshake, YamuxNoise, "per_s")?;
        Some((f >= 2.0 * noise, f / noise))
    })();

    println!("\n## targets (issue 3), flow-tcp");
    println!(
        "  throughput >= 3x yamux-noise and > yamux: {}{}",
        verdict(throughput.map(|t| t.0)),
        throughput
            .map(|t| format!(" ({:.2}x yamux-noise, {:.2}x yamux)", t.1, t.2))
            .unwrap_or_default()
    );
    println!(
        "  rtt p50 <= 1.2x tcp: {}{}",
        verdict(rtt.map(|t| t.0)),
        rtt.map(|t| format!(" ({:.2}x)", t.1)).unwrap_or_default()
    );
    println!(
        "  rtt-under-load p99 <= 1 ms with bulk >= 80% of solo: {}{}",
        verdict(loaded.map(|t| t.0)),
        loaded
            .map(|t| format!(" (p99 {:.0} us, bulk {:.0}% of solo)", t.1, t.2 * 100.0))
            .unwrap_or_default()
    );
    println!(
        "  open >= 2x yamux, 32 in flight: {}{}",
        verdict(open.map(|t| t.0)),
        open.map(|t| format!(" ({:.2}x)", t.1)).unwrap_or_default()
    );
    println!(
        "  open >= 2x yamux, one at a time: {}{}",
        verdict(open_one.map(|t| t.0)),
        open_one
            .map(|t| format!(" ({:.2}x)", t.1))
            .unwrap_or_default()
    );
    println!(
        "  idle-memory <= 1 KiB per flow: {}{}",
        verdict(memory.map(|t| t.0)),
        memory
            .map(|t| format!(" ({:.0} bytes)", t.1))
            .unwrap_or_default()
    );
    println!(
        "  handshake >= 2x tcp+noise XX+ed25519 (yamux-noise): {}{}",
        verdict(handshake.map(|t| t.0)),
        handshake
            .map(|t| format!(" ({:.2}x)", t.1))
            .unwrap_or_default()
    );
}
