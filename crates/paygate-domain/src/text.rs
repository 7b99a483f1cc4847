//! Every piece of human-entered text Paygate accepts passes through here:
//! company, key and payee names, owners, payment references, reasons,
//! descriptions and metadata. One rule set, so that what an approver or a
//! payee reads is what was stored, and two identities that look alike are one.

use std::fmt;

use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("must not be empty")]
    Empty,
    #[error("must be at most {0} characters")]
    TooLong(usize),
    #[error("must not contain control, invisible, formatting or bidirectional control characters")]
    ControlCharacter,
}

/// The stored form of free text: NFKC (so a fullwidth or mathematical-bold
/// "alice" is stored as "alice"), refused if any code point is a control,
/// format (Cf, bidi controls included), default-ignorable, private-use,
/// unassigned, or otherwise invisible character; any Paygate key in it is
/// redacted. Not trimmed, no length rule: the field decides those.
pub fn normalize(text: &str) -> Result<String, LabelError> {
    if text.chars().any(is_refused) {
        return Err(LabelError::ControlCharacter);
    }
    let normalized: String = text.nfkc().collect();
    if normalized.chars().any(is_refused) {
        return Err(LabelError::ControlCharacter);
    }
    Ok(crate::key::redact_keys(&normalized).into_owned())
}

/// [`normalize`] for a bounded field: trimmed, at most `max_chars`
/// characters (counted after normalization), empty allowed or not.
pub fn field(text: &str, max_chars: usize, allow_empty: bool) -> Result<String, LabelError> {
    let text = normalize(text.trim())?;
    let text = text.trim();
    if text.is_empty() && !allow_empty {
        return Err(LabelError::Empty);
    }
    if text.chars().count() > max_chars {
        return Err(LabelError::TooLong(max_chars));
    }
    Ok(text.to_owned())
}

/// Code points that make two different strings look the same, hide text, or
/// reorder it on screen: none belongs in a name, an owner or a reference.
pub fn is_refused(c: char) -> bool {
    if c == ' ' {
        return false;
    }
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::Surrogate
            | GeneralCategory::PrivateUse
            | GeneralCategory::Unassigned
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    ) || c.is_whitespace()
        || is_default_ignorable(c)
        || is_blank_lookalike(c)
}

/// Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt):
/// rendered as nothing, so "al\u{34F}ice" shows as "alice".
fn is_default_ignorable(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}'..='\u{1160}' | '\u{17B4}'..='\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}' | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{FFF0}'..='\u{FFF8}' | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// Visible-as-nothing characters that are not default-ignorable (the Hangul
/// fillers are): the Braille blank.
fn is_blank_lookalike(c: char) -> bool {
    c == '\u{2800}'
}

/// The form in which two identities (owners) are compared: case-folded NFKC,
/// then the UTS #39 confusable skeleton, without combining marks or white
/// space differences. Cyrillic "а", fullwidth "ａ", mathematical "𝐚" and "a"
/// are one letter here; so are "ı", "İ" and "i". Stricter than it has to be
/// ("rené" and "rene" are one owner): a false match only asks for another
/// approver, a false distinction lets one person approve their own payment.
pub fn identity_key(text: &str) -> String {
    // Stored text from before these rules may still hold invisible code
    // points: they are dropped here, not compared (before the skeleton too,
    // which maps some of them to visible ones).
    let folded = case_fold(text.nfkc().filter(|c| *c == ' ' || !is_refused(*c)));
    let skeleton: String = unicode_security::skeleton(&folded).collect();
    let bare: String =
        case_fold(skeleton.nfkd()).nfd().filter(|c| *c == ' ' || !(is_mark(*c) || is_refused(*c))).collect();
    bare.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Full case folding for the comparisons above: upper then lower maps "ß" to
/// "ss" and "ς" to "σ" as folding does.
fn case_fold(chars: impl Iterator<Item = char>) -> String {
    chars.flat_map(char::to_uppercase).flat_map(char::to_lowercase).collect()
}

fn is_mark(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::NonspacingMark | GeneralCategory::SpacingMark | GeneralCategory::EnclosingMark
    )
}

/// Trimmed, NFKC, 1..=200 characters, nothing [`is_refused`]: safe to print
/// in a log, a terminal or an audit record without escaping surprises.
#[derive(Clone, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Label(String);

impl Label {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(text: &str) -> Result<Self, LabelError> {
        field(text, Self::MAX_CHARS, false).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// How this label compares as an identity (see [`identity_key`]).
    pub fn identity_key(&self) -> String {
        identity_key(&self.0)
    }
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
        assert_eq!(Label::parse("ａｌｉｃｅ").unwrap().as_str(), "alice", "stored as NFKC");
        assert_eq!(Label::parse("e\u{301}").unwrap().as_str(), "\u{e9}");
        assert_eq!(Label::parse(&"é".repeat(201)), Err(LabelError::TooLong(200)));
    }
}

#[cfg(test)]
pub(crate) mod identity_tests {
    use super::*;

    /// Owners that a person reads as "alice": each must either be refused as
    /// text or compare equal to "alice" as an identity.
    pub const ALICE_LOOKALIKES: [&str; 24] = [
        "\u{430}lice",                                   // Cyrillic а
        "alic\u{435}",                                   // Cyrillic е
        "\u{430}li\u{441}\u{435}",                       // Cyrillic а, с, е
        "\u{FF41}\u{FF4C}\u{FF49}\u{FF43}\u{FF45}",      // fullwidth
        "\u{1D41A}\u{1D425}\u{1D422}\u{1D41C}\u{1D41E}", // mathematical bold
        "\u{1D4B6}\u{1D4C1}\u{1D4BE}\u{1D4B8}\u{212F}",  // mathematical script
        "al\u{131}ce",                                   // dotless ı
        "AL\u{130}CE",                                   // dotted İ
        "Alice",                                         // case
        "\u{251}lice",                                   // Latin alpha
        "alice\u{E0041}",                                // tag character
        "al\u{E0020}ice",                                // tag space
        "al\u{34F}ice",                                  // combining grapheme joiner
        "alice\u{FE0F}",                                 // variation selector 16
        "alice\u{FE00}",                                 // variation selector 1
        "al\u{3164}ice",                                 // Hangul filler
        "alice\u{115F}",                                 // Hangul choseong filler
        "alice\u{FFA0}",                                 // halfwidth Hangul filler
        "al\u{2800}ice",                                 // Braille blank
        "alice\u{180B}",                                 // Mongolian free variation selector
        "alice\u{180E}",                                 // Mongolian vowel separator
        "alice\u{17B4}",                                 // Khmer inherent vowel
        "al\u{200D}ice",                                 // zero-width joiner
        "alice\u{1D173}",                                // musical begin-beam format character
    ];

    #[test]
    fn every_lookalike_is_refused_or_the_same_identity() {
        let alice = identity_key("alice");
        for variant in ALICE_LOOKALIKES {
            match Label::parse(variant) {
                Err(LabelError::ControlCharacter) => {}
                Ok(label) => assert_eq!(label.identity_key(), alice, "{variant:?} is a second identity"),
                Err(e) => panic!("{variant:?}: {e}"),
            }
            // Stored text from before this rule is compared the same way.
            assert!(Label::parse(variant).is_err() || identity_key(variant) == alice, "{variant:?}");
        }
    }

    #[test]
    fn distinct_identities_stay_distinct() {
        for (a, b) in [("alice", "bob"), ("alice", "alicia"), ("erp", "erp 2"), ("ops-1", "ops-2")] {
            assert_ne!(identity_key(a), identity_key(b), "{a} / {b}");
        }
        assert_eq!(identity_key("  Alice   Smith "), identity_key("alice smith"));
        assert_eq!(identity_key("Straße"), identity_key("STRASSE"));
    }

    #[test]
    fn free_text_refusals() {
        for bad in ["a\u{0}b", "\u{1b}[31mred", "\u{202E}gnp.exe", "x\u{2066}y", "a\u{2028}b", "\u{E000}", "a\tb"] {
            assert_eq!(normalize(bad), Err(LabelError::ControlCharacter), "{bad:?}");
        }
        assert_eq!(normalize("Rechnung 2026-001 für Müller").unwrap(), "Rechnung 2026-001 für Müller");
        assert_eq!(field("  ", 10, true).unwrap(), "");
        assert_eq!(field("  ", 10, false), Err(LabelError::Empty));
    }
}
