//! Keys for the flood scenarios: well-formed keys that fail in different
//! stages of the pipeline.

use paygate_domain::{KeyHasher, KeyMode, Pepper};

/// A checksum-valid key that exists nowhere: it passes parsing (step 3) and
/// costs a cache miss and a store lookup (step 4) on every request.
pub fn unknown_key() -> String {
    let pepper = Pepper::from_hex(1, &Pepper::generate_hex()).expect("generated pepper is valid");
    KeyHasher::new(&pepper).generate(KeyMode::Test).text.to_string()
}

/// `key` with its last checksum character changed: refused at step 3
/// without any lookup.
pub fn with_bad_checksum(key: &str) -> String {
    let mut text = key.to_owned();
    let last = text.pop().expect("a key is not empty");
    text.push(if last == 'A' { 'B' } else { 'A' });
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use paygate_domain::{ApiKeyText, KeyParseError};

    #[test]
    fn unknown_keys_are_well_formed_and_fresh() {
        let a = unknown_key();
        assert!(ApiKeyText::parse(&a).is_ok());
        assert_ne!(a, unknown_key());
    }

    #[test]
    fn bad_checksum_keys_fail_only_the_checksum() {
        let key = with_bad_checksum(&unknown_key());
        assert_eq!(ApiKeyText::parse(&key).err(), Some(KeyParseError::BadChecksum));
    }
}
