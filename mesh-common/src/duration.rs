//! Durations on command lines: `500ms`, `90s`, `30m`, `24h`, or plain seconds.
use std::time::Duration;

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected a number and a unit (ms, s, m, h), e.g. 5s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    }
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
    }
}
