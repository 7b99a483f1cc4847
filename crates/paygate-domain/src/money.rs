//! Money: ISO 4217 currencies with their exponent, amounts in integer minor units.

use std::fmt;

/// The largest amount in minor units: 2^53 − 1, so every amount survives a
/// round trip through a JavaScript number (and JSON parsers that use f64).
pub const MAX_AMOUNT: u64 = (1 << 53) - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("must be a three-letter ISO 4217 currency code, e.g. \"EUR\"")]
    UnknownCurrency,
    #[error("{0} has no minor unit (precious metals, funds and testing codes cannot be paid)")]
    NoMinorUnit(&'static str),
    #[error("must be an integer number of minor units (e.g. 1050 for 10.50 EUR)")]
    NotAnInteger,
    #[error("must be greater than 0")]
    NotPositive,
    #[error("must be at most {MAX_AMOUNT} (2^53 - 1) minor units")]
    TooLarge,
}

/// An ISO 4217 currency with a defined minor unit.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    code: &'static str,
    exponent: u8,
}

impl Currency {
    /// Accepts only the upper-case code: "eur" is refused rather than guessed.
    pub fn parse(code: &str) -> Result<Self, MoneyError> {
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(MoneyError::UnknownCurrency);
        }
        let currency = iso_currency::Currency::from_code(code).ok_or(MoneyError::UnknownCurrency)?;
        let exponent = currency.exponent().ok_or(MoneyError::NoMinorUnit(currency.code()))?;
        Ok(Self { code: currency.code(), exponent: exponent as u8 })
    }

    pub fn code(&self) -> &'static str {
        self.code
    }

    /// Digits after the decimal point: JPY 0, EUR 2, KWD 3.
    pub fn exponent(&self) -> u8 {
        self.exponent
    }

    /// `amount` minor units written in major units, e.g. `1000.00` (for logs and
    /// audit details; never parsed back).
    pub fn format(&self, amount: Amount) -> String {
        let v = amount.0;
        if self.exponent == 0 {
            return v.to_string();
        }
        let scale = 10u64.pow(self.exponent as u32);
        format!("{}.{:0width$}", v / scale, v % scale, width = self.exponent as usize)
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code)
    }
}

/// A positive amount in minor units, at most [`MAX_AMOUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Amount(u64);

impl Amount {
    pub fn new(minor_units: u64) -> Result<Self, MoneyError> {
        match minor_units {
            0 => Err(MoneyError::NotPositive),
            v if v > MAX_AMOUNT => Err(MoneyError::TooLarge),
            v => Ok(Self(v)),
        }
    }

    /// From a JSON value: only a JSON integer is an amount. `10.5`, `1e3` and
    /// `"1000"` are refused rather than rounded or coerced.
    pub fn from_json(value: &serde_json::Value) -> Result<Self, MoneyError> {
        match value {
            serde_json::Value::Number(n) => match (n.as_u64(), n.as_i64()) {
                (Some(v), _) => Self::new(v),
                (None, Some(_)) => Err(MoneyError::NotPositive),
                (None, None) => Err(MoneyError::NotAnInteger),
            },
            _ => Err(MoneyError::NotAnInteger),
        }
    }

    pub fn minor_units(self) -> u64 {
        self.0
    }
}

/// A threshold in minor units: 0 ..= [`MAX_AMOUNT`] (0 means "every amount").
pub fn threshold_from_json(value: &serde_json::Value) -> Result<u64, MoneyError> {
    match value {
        serde_json::Value::Number(n) if n.as_u64() == Some(0) => Ok(0),
        v => Amount::from_json(v).map(Amount::minor_units),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn exponents_come_from_iso_4217() {
        assert_eq!(Currency::parse("JPY").unwrap().exponent(), 0);
        assert_eq!(Currency::parse("EUR").unwrap().exponent(), 2);
        assert_eq!(Currency::parse("KWD").unwrap().exponent(), 3);
    }

    #[test]
    fn refuses_unknown_lowercase_and_unit_less_codes() {
        for code in ["eur", "EU", "EURO", "ZZZ", "", "€"] {
            assert_eq!(Currency::parse(code), Err(MoneyError::UnknownCurrency), "{code}");
        }
        assert!(matches!(Currency::parse("XAU"), Err(MoneyError::NoMinorUnit("XAU"))));
    }

    #[test]
    fn amounts_are_positive_integers_up_to_2_pow_53_minus_1() {
        assert_eq!(Amount::from_json(&json!(1)).unwrap().minor_units(), 1);
        assert_eq!(Amount::from_json(&json!(MAX_AMOUNT)).unwrap().minor_units(), MAX_AMOUNT);
        assert_eq!(Amount::from_json(&json!(MAX_AMOUNT + 1)), Err(MoneyError::TooLarge));
        assert_eq!(Amount::from_json(&json!(0)), Err(MoneyError::NotPositive));
        assert_eq!(Amount::from_json(&json!(-5)), Err(MoneyError::NotPositive));
        assert_eq!(Amount::from_json(&json!(10.5)), Err(MoneyError::NotAnInteger));
        assert_eq!(Amount::from_json(&json!(1e3)), Err(MoneyError::NotAnInteger));
        assert_eq!(Amount::from_json(&json!("1000")), Err(MoneyError::NotAnInteger));
        assert_eq!(Amount::from_json(&json!(null)), Err(MoneyError::NotAnInteger));
    }

    #[test]
    fn formats_in_major_units() {
        let a = Amount::new(100_005).unwrap();
        assert_eq!(Currency::parse("EUR").unwrap().format(a), "1000.05");
        assert_eq!(Currency::parse("JPY").unwrap().format(a), "100005");
        assert_eq!(Currency::parse("KWD").unwrap().format(a), "100.005");
    }
}
