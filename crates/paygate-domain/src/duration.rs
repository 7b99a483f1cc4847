//! Human durations for the CLI and config: `90s`, `15m`, `12h`, `30d`, `2w`.

use time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: expected a positive number followed by s, m, h, d or w (e.g. 30d)")]
pub struct DurationParseError(pub String);

pub fn parse_duration(text: &str) -> Result<Duration, DurationParseError> {
    let err = || DurationParseError(text.to_owned());
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (digits, unit) = text.split_at(split);
    let n: i64 = digits.parse().map_err(|_| err())?;
    if n <= 0 {
        return Err(err());
    }
    let seconds_per_unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return Err(err()),
    };
    // Cap at 100 years so arithmetic on timestamps can never overflow.
    let seconds = n.checked_mul(seconds_per_unit).filter(|s| *s <= 100 * 365 * 86_400).ok_or_else(err)?;
    Ok(Duration::seconds(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::seconds(90)));
        assert_eq!(parse_duration("30d"), Ok(Duration::days(30)));
        assert_eq!(parse_duration("2w"), Ok(Duration::weeks(2)));
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "d", "0d", "-1d", "1y", "10", "1.5d", "999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
