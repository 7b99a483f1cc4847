//! Short human-entered text: company names, key names, owners.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {0} characters")]
    TooLong(usize),
    #[error("must not contain control or invisible formatting characters")]
    ControlCharacter,
}

/// Trimmed, 1..=200 characters, no control characters: safe to print in a log,
/// a terminal or an audit record without escaping surprises.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Label(String);

impl Label {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(text: &str) -> Result<Self, LabelError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(LabelError::Empty);
        }
        if text.chars().count() > Self::MAX_CHARS {
            return Err(LabelError::TooLong(Self::MAX_CHARS));
        }
        if text.chars().any(|c| c.is_control() || is_invisible_format(c)) {
            return Err(LabelError::ControlCharacter);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Zero-width and bidirectional formatting characters (Unicode category Cf in
/// common use): they make two different labels look identical, and owners are
/// compared by four-eyes rules.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}' | '\u{FFF9}'..='\u{FFFB}')
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(Label::parse("  Acme  ").unwrap().as_str(), "Acme");
        assert_eq!(Label::parse(" "), Err(LabelError::Empty));
        assert_eq!(Label::parse("a\nb"), Err(LabelError::ControlCharacter));
        assert_eq!(Label::parse("alice\u{200B}"), Err(LabelError::ControlCharacter));
        assert_eq!(Label::parse("\u{202E}ecila"), Err(LabelError::ControlCharacter));
        assert!(Label::parse(&"é".repeat(200)).is_ok());
        assert_eq!(Label::parse(&"é".repeat(201)), Err(LabelError::TooLong(200)));
    }
}
