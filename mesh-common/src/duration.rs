//! Durations on command lines: `500ms`, `90s`, `30m`, `24h`, or plain seconds.
use std::time::Duration;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?}: expected a number and a unit (ms, s, m, h), e.g. 5s, 1.5s or 1m30s");
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return s.parse::<u64>().map(Duration::from_secs).map_err(|_| bad()); // bare seconds
    }
    // One or more `<number><unit>` parts (Gateway API's `1h30m`, protobuf's `0.5s`).
    let mut rest = s;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let n_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(bad)?;
        let (n, tail) = rest.split_at(n_end);
        let u_end = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(u_end);
        let n: f64 = n.parse().map_err(|_| bad())?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
        };
        total += Duration::try_from_secs_f64(secs).map_err(|_| bad())?;
        rest = tail;
    }
    if s.is_empty() { Err(bad()) } else { Ok(total) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (s, want) in
            [("500ms", Ok(500)), ("5s", Ok(5000)), ("2m", Ok(120_000)), ("1h", Ok(3_600_000)), ("7", Ok(7000))]
        {
            assert_eq!(parse_duration(s).map(|d| d.as_millis() as u64), want.map_err(|_: ()| String::new()), "{s}");
        }
        assert!(parse_duration("5d").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("s").unwrap_err().contains("expected a number"));
        for (s, ms) in [("1.5s", 1500), ("0.25s", 250), ("1m30s", 90_000), ("1h2m3s4ms", 3_723_004)] {
            assert_eq!(parse_duration(s).map(|d| d.as_millis() as u64), Ok(ms), "{s}");
        }
        for bad in ["-1s", "", "1.2.3s", "5 s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
