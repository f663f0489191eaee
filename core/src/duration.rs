//! Durations as operators write them: `90s`, `30m`, `24h`, `7d`.

/// `90`, `90s`, `30m`, `24h`, `7d` → seconds.
pub fn parse_secs(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: i64 = number.parse().map_err(|_| format!("{text:?} is not a duration like 30m, 24h or 7d"))?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{text:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(factor).ok_or_else(|| format!("{text:?} is too long"))
}

/// As [`parse_secs`], refusing zero.
pub fn parse_positive_secs(text: &str) -> Result<i64, String> {
    parse_secs(text).and_then(|secs| if secs > 0 { Ok(secs) } else { Err("must be more than 0".to_owned()) })
}

/// Seconds back to the shortest exact form: 1209600 → `14d`.
pub fn format_secs(secs: i64) -> String {
    match secs {
        0 => "0s".to_owned(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_secs("90"), Ok(90));
        assert_eq!(parse_secs("30m"), Ok(1800));
        assert_eq!(parse_secs("24h"), Ok(86_400));
        assert_eq!(parse_secs("14d"), Ok(1_209_600));
        assert!(parse_secs("1w").is_err());
        assert!(parse_secs("h").is_err());
        assert!(parse_secs("-5m").is_err());
        assert!(parse_secs("99999999999999999d").is_err());
        assert!(parse_positive_secs("0s").is_err());
        assert_eq!(parse_positive_secs("2m"), Ok(120));
        assert_eq!(format_secs(1_209_600), "14d");
        assert_eq!(format_secs(5400), "90m");
        assert_eq!(format_secs(61), "61s");
    }
}
