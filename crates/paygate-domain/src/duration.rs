//! The one duration syntax of the CLI and the configuration: a whole number
//! followed by `ms`, `s`, `m`, `h`, `d` or `w` (`500ms`, `90s`, `15m`, `12h`,
//! `30d`, `2w`). Key lifetimes and webhook retry delays both parse here.

use time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: expected a number followed by ms, s, m, h, d or w (e.g. 30d)")]
pub struct DurationParseError(pub String);

/// Any duration in the syntax, zero included, at most 100 years (so
/// arithmetic on timestamps can never overflow).
pub fn parse_span(text: &str) -> Result<std::time::Duration, DurationParseError> {
    let err = || DurationParseError(text.to_owned());
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() || digits.len() > 15 {
        return Err(err());
    }
    let n: u64 = digits.parse().map_err(|_| err())?;
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => return Err(err()),
    };
    let ms = n.checked_mul(ms_per_unit).filter(|ms| *ms <= 100 * 365 * 86_400_000).ok_or_else(err)?;
    Ok(std::time::Duration::from_millis(ms))
}

/// A positive duration (key lifetimes).
pub fn parse_duration(text: &str) -> Result<Duration, DurationParseError> {
    let span = parse_span(text)?;
    if span.is_zero() {
        return Err(DurationParseError(text.to_owned()));
    }
    Duration::try_from(span).map_err(|_| DurationParseError(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("90s"), Ok(Duration::seconds(90)));
        assert_eq!(parse_duration("30d"), Ok(Duration::days(30)));
        assert_eq!(parse_duration("2w"), Ok(Duration::weeks(2)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::milliseconds(1500)));
        assert_eq!(parse_span("0s"), Ok(std::time::Duration::ZERO));
    }

    /// Key lifetimes and webhook retry delays read the same syntax.
    #[test]
    fn one_syntax_for_lifetimes_and_retry_delays() {
        use crate::webhook::RetrySchedule;
        for text in ["500ms", "90s", "15m", "12h", "3d", "1w"] {
            let span = parse_span(text).unwrap();
            assert_eq!(parse_duration(text).unwrap().whole_milliseconds() as u128, span.as_millis(), "{text}");
            let schedule = RetrySchedule::parse(&format!("0s,{text}")).unwrap();
            assert_eq!(schedule.delay_before(2), Some(span), "{text}");
        }
        assert!(RetrySchedule::parse("0s,1y").is_err() && parse_duration("1y").is_err());
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "d", "0d", "-1d", "1y", "10", "1.5d", "999999999999999999w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
