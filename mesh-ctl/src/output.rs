//! Every command's result in the three forms `-o` offers: a table for people,
//! JSON and YAML (the same data) for scripts.
use std::fmt::Write as _;

use clap::ValueEnum;
use serde::Serialize;
use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
    /// Drawings, for `mesh-ctl graph` only: Graphviz DOT, SVG, PNG.
    Dot,
    Svg,
    Png,
}

impl Format {
    pub fn is_drawing(self) -> bool {
        matches!(self, Format::Dot | Format::Svg | Format::Png)
    }
}

/// What a command found: `data` for JSON and YAML, `text` for the table form.
pub struct Report {
    pub data: Value,
    pub text: String,
    /// The command found something wrong (`check`'s problems, a denied
    /// `authz explain`...): printed, then the exit code is non-zero.
    pub failed: bool,
}

impl Report {
    pub fn new(data: impl Serialize, text: String) -> Report {
        Report { data: serde_json::to_value(data).unwrap_or(Value::Null), text, failed: false }
    }

    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table | Format::Dot | Format::Svg | Format::Png => self.text.clone(),
            Format::Json => serde_json::to_string_pretty(&self.data).unwrap_or_default() + "\n",
            Format::Yaml => serde_yaml_ng::to_string(&self.data).unwrap_or_default(),
        }
    }
}

/// Columns padded to their widest cell; an empty table says so.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table { headers: headers.to_vec(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self, empty: &str) -> String {
        if self.rows.is_empty() {
            return format!("{empty}\n");
        }
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
            let mut text = String::new();
            for (cell, w) in cells.zip(&widths) {
                let _ = write!(text, "{cell:<w$}  ");
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut out, &mut self.headers.iter().copied());
        for row in &self.rows {
            line(&mut out, &mut row.iter().map(String::as_str));
        }
        out
    }
}

/// A JSON value as a table cell: strings bare, null as `-`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `2026-11-21T10:04:05Z` from seconds since the epoch (UTC, proleptic Gregorian).
pub fn rfc3339(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", secs / 3600, secs % 3600 / 60, secs % 60)
}

/// `3h12m`, `45s`, `2d4h`: a duration in its two largest units.
pub fn human_duration(secs: i64) -> String {
    let s = secs.unsigned_abs();
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    let text = match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, _) => format!("{h}h{m}m"),
        _ => format!("{d}d{h}h"),
    };
    if secs < 0 { format!("-{text}") } else { text }
}

/// `12.3 KiB`: a byte count a person reads at a glance.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_durations() {
        for (unix, want) in [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_795_262_645, "2026-11-21T12:04:05Z"),
            (4_102_444_799, "2099-12-31T23:59:59Z"),
        ] {
            assert_eq!(rfc3339(unix), want, "{unix}");
        }
        for (secs, want) in
            [(5, "5s"), (75, "1m15s"), (3 * 3600 + 720, "3h12m"), (2 * 86_400 + 4 * 3600, "2d4h"), (-30, "-30s")]
        {
            assert_eq!(human_duration(secs), want);
        }
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(12_595), "12.3 KiB");
    }

    #[test]
    fn tables_pad_columns_and_say_when_empty() {
        let mut t = Table::new(&["NAME", "IP"]);
        assert_eq!(t.render("no workloads"), "no workloads\n");
        t.row(vec!["frontend".into(), "10.0.0.1".into()]);
        t.row(vec!["db".into(), "10.0.0.22".into()]);
        assert_eq!(t.render(""), "NAME      IP\nfrontend  10.0.0.1\ndb        10.0.0.22\n");
    }
}
