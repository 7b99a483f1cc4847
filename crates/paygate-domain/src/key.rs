//! API key text, generation and hashing.
//!
//! Layout (ADR 0001): `pgk_{live|test}_key_<22 base62 id>_<43 base62 secret><6 base62 checksum>`.
//! The checksum is CRC-32 (IEEE) of everything before it, so a typo or a truncated
//! paste is rejected without touching the database, and secret scanners can
//! confirm a match offline. The secret is 256 bits from the OS CSPRNG; only
//! HMAC-SHA256(pepper, secret) is ever stored.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::base62;
use crate::id::ApiKeyId;

pub const KEY_PREFIX: &str = "pgk_";
pub const SECRET_LEN: usize = 43;
pub const CHECKSUM_LEN: usize = base62::U32_WIDTH;
/// `pgk_` + `test_` + id + `_` + secret + checksum.
pub const KEY_TEXT_LEN: usize = KEY_PREFIX.len() + 5 + ApiKeyId::TEXT_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;
/// The regular expression secret scanners should use (documented in ADR 0001).
pub const KEY_REGEX: &str = r"\bpgk_(live|test)_key_[0-9A-Za-z]{22}_[0-9A-Za-z]{49}\b";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum KeyMode {
    Live,
    Test,
}

impl KeyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Test => "test",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "live" => Some(Self::Live),
            "test" => Some(Self::Test),
            _ => None,
        }
    }
}

impl fmt::Display for KeyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a string is not a Paygate key. Deliberately coarse: the HTTP layer maps
/// every variant to the same 401, the variants exist for metrics and `key check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    #[error("not in the Paygate key format")]
    Malformed,
    #[error("checksum does not match")]
    BadChecksum,
}

impl KeyParseError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::BadChecksum => "bad_checksum",
        }
    }
}

/// What replaces a key found in free text.
pub const REDACTED_KEY: &str = "pgk_[redacted]";

/// Free text (a user agent, a reference, a metadata value) with every
/// Paygate key in it replaced by [`REDACTED_KEY`]: the checksum tells a real
/// key from look-alike text, so nothing else is touched. A key pasted into
/// the wrong field must not end up in the audit log or a log line.
pub fn redact_keys(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(KEY_PREFIX) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(KEY_PREFIX) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        let run = tail.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'_').count();
        if run >= KEY_TEXT_LEN && ApiKeyText::parse(&tail[..KEY_TEXT_LEN]).is_ok() {
            out.push_str(REDACTED_KEY);
            rest = &tail[KEY_TEXT_LEN..];
        } else {
            out.push_str(KEY_PREFIX);
            rest = &tail[KEY_PREFIX.len()..];
        }
    }
    out.push_str(rest);
    std::borrow::Cow::Owned(out)
}

/// A well-formed key with a valid checksum. Holds the secret; never printed.
pub struct ApiKeyText {
    mode: KeyMode,
    id: ApiKeyId,
    secret: Zeroizing<[u8; SECRET_LEN]>,
}

impl ApiKeyText {
    /// Parses key text. Pure and allocation-free: safe to run on every request
    /// before any IO.
    pub fn parse(text: &str) -> Result<Self, KeyParseError> {
        use KeyParseError::*;
        let bytes = text.as_bytes();
        // ASCII first: every slice below is then on a character boundary.
        if bytes.len() != KEY_TEXT_LEN || !text.is_ascii() {
            return Err(Malformed);
        }
        let rest = text.strip_prefix(KEY_PREFIX).ok_or(Malformed)?;
        let mode = KeyMode::parse(&rest[..4]).ok_or(Malformed)?;
        if rest.as_bytes()[4] != b'_' {
            return Err(Malformed);
        }
        let rest = &rest[5..];
        let (id_text, rest) = rest.split_at(ApiKeyId::TEXT_LEN);
        let id = ApiKeyId::parse(id_text).map_err(|_| Malformed)?;
        let rest = rest.strip_prefix('_').ok_or(Malformed)?;
        let (secret, checksum) = rest.split_at(SECRET_LEN);
        if !secret.bytes().all(base62::is_base62) {
            return Err(Malformed);
        }
        let expected = base62::decode(checksum).ok_or(Malformed)?;
        let body = &text[..text.len() - CHECKSUM_LEN];
        if expected != crc32fast::hash(body.as_bytes()) as u128 {
            return Err(BadChecksum);
        }
        let mut buf = Zeroizing::new([0u8; SECRET_LEN]);
        buf.copy_from_slice(secret.as_bytes());
        Ok(Self { mode, id, secret: buf })
    }

    pub fn mode(&self) -> KeyMode {
        self.mode
    }

    pub fn id(&self) -> ApiKeyId {
        self.id
    }

    pub fn secret(&self) -> &[u8] {
        &self.secret[..]
    }
}

impl fmt::Debug for ApiKeyText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyText").field("mode", &self.mode).field("id", &self.id).finish_non_exhaustive()
    }
}

/// A freshly generated key: the text to show once, and the hash to store.
pub struct GeneratedKey {
    pub id: ApiKeyId,
    pub text: Zeroizing<String>,
    pub hash: SecretHash,
    pub pepper_version: u16,
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKey").field("id", &self.id).finish_non_exhaustive()
    }
}

/// HMAC-SHA256(pepper, secret). 32 bytes, compared in constant time.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SecretHash(pub [u8; 32]);

impl SecretHash {
    pub fn ct_eq(&self, other: &SecretHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretHash(..)")
    }
}

/// The server secret mixed into every key hash. A database dump alone cannot be
/// used to brute-force or verify keys without it. Versioned so it can be rotated.
pub struct Pepper {
    version: u16,
    bytes: Zeroizing<Vec<u8>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PepperError {
    #[error("must be at least 32 bytes (64 hex characters)")]
    TooShort,
    #[error("must be hex encoded")]
    NotHex,
    #[error("version must be between 1 and 65535")]
    BadVersion,
}

impl Pepper {
    pub const MIN_LEN: usize = 32;

    pub fn new(version: u16, bytes: Vec<u8>) -> Result<Self, PepperError> {
        if version == 0 {
            return Err(PepperError::BadVersion);
        }
        if bytes.len() < Self::MIN_LEN {
            return Err(PepperError::TooShort);
        }
        Ok(Self { version, bytes: Zeroizing::new(bytes) })
    }

    /// Parses the hex form used in config and pepper files (whitespace trimmed).
    pub fn from_hex(version: u16, text: &str) -> Result<Self, PepperError> {
        let text = text.trim();
        if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(PepperError::NotHex);
        }
        let bytes = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|_| PepperError::NotHex))
            .collect::<Result<Vec<u8>, _>>()?;
        Self::new(version, bytes)
    }

    /// 32 fresh random bytes, hex encoded, for a new pepper file.
    pub fn generate_hex() -> Zeroizing<String> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut bytes[..]).expect("the OS CSPRNG is available");
        let mut out = Zeroizing::new(String::with_capacity(64));
        for b in bytes.iter() {
            out.push_str(&format!("{b:02x}"));
        }
        out
    }

    pub fn version(&self) -> u16 {
        self.version
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pepper").field("version", &self.version).finish_non_exhaustive()
    }
}

/// Hashes and verifies key secrets with the current pepper.
#[derive(Clone)]
pub struct KeyHasher {
    version: u16,
    // The keyed HMAC state, cloned per use: saves the key schedule on the hot path.
    keyed: Hmac<Sha256>,
}

impl KeyHasher {
    pub fn new(pepper: &Pepper) -> Self {
        let keyed = <Hmac<Sha256> as KeyInit>::new_from_slice(&pepper.bytes).expect("HMAC accepts any key length");
        Self { version: pepper.version, keyed }
    }

    pub fn pepper_version(&self) -> u16 {
        self.version
    }

    pub fn hash(&self, secret: &[u8]) -> SecretHash {
        let mut mac = self.keyed.clone();
        mac.update(secret);
        SecretHash(mac.finalize().into_bytes().into())
    }

    /// Constant-time check of `secret` against a stored hash. A hash made with a
    /// pepper version this node does not hold never verifies.
    pub fn verify(&self, secret: &[u8], stored: &SecretHash, stored_version: u16) -> bool {
        let computed = self.hash(secret);
        let same_version = stored_version == self.version;
        computed.ct_eq(stored) & same_version
    }

    /// A new key for `mode`: 256-bit secret from the OS CSPRNG, checksummed text.
    pub fn generate(&self, mode: KeyMode) -> GeneratedKey {
        let id = ApiKeyId::generate();
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut raw[..]).expect("the OS CSPRNG is available");
        let mut secret = Zeroizing::new(base62::encode_bytes_fixed(&raw[..], SECRET_LEN));
        let hash = self.hash(secret.as_bytes());
        let mut text = Zeroizing::new(String::with_capacity(KEY_TEXT_LEN));
        text.push_str(KEY_PREFIX);
        text.push_str(mode.as_str());
        text.push('_');
        text.push_str(&id.to_string());
        text.push('_');
        text.push_str(&secret);
        secret.zeroize();
        let checksum = crc32fast::hash(text.as_bytes());
        base62::encode_fixed(checksum as u128, CHECKSUM_LEN, &mut text);
        GeneratedKey { id, text, hash, pepper_version: self.version }
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyHasher").field("version", &self.version).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hasher() -> KeyHasher {
        KeyHasher::new(&Pepper::new(1, vec![7u8; 32]).unwrap())
    }

    #[test]
    fn keys_in_free_text_are_redacted_and_near_keys_are_not() {
        let key = hasher().generate(KeyMode::Live);
        let text: &str = &key.text;
        assert_eq!(redact_keys(&format!("curl/8 {text}")), format!("curl/8 {REDACTED_KEY}"));
        assert_eq!(redact_keys(&format!("{text},{text}x")), format!("{REDACTED_KEY},{REDACTED_KEY}x"));
        // A wrong checksum is not a key: left alone, so nothing else is eaten.
        let mut wrong = text.to_owned();
        let last = if wrong.ends_with('a') { "b" } else { "a" };
        wrong.replace_range(wrong.len() - 1.., last);
        assert_eq!(redact_keys(&wrong), wrong);
        assert_eq!(redact_keys("pgk_ pgk_test_ über"), "pgk_ pgk_test_ über");
        assert!(matches!(redact_keys("no key here"), std::borrow::Cow::Borrowed(_)));
    }

    #[test]
    fn generated_keys_parse_and_verify() {
        let h = hasher();
        let key = h.generate(KeyMode::Test);
        assert_eq!(key.text.len(), KEY_TEXT_LEN);
        let parsed = ApiKeyText::parse(&key.text).unwrap();
        assert_eq!(parsed.id(), key.id);
        assert_eq!(parsed.mode(), KeyMode::Test);
        assert!(h.verify(parsed.secret(), &key.hash, 1));
        assert!(!h.verify(parsed.secret(), &key.hash, 2), "other pepper version");
        let other = KeyHasher::new(&Pepper::new(1, vec![8u8; 32]).unwrap());
        assert!(!other.verify(parsed.secret(), &key.hash, 1), "other pepper");
    }

    #[test]
    fn every_single_character_change_is_detected() {
        let key = hasher().generate(KeyMode::Live);
        let text: &str = &key.text;
        for i in 0..text.len() {
            let mut bytes = text.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let changed = String::from_utf8(bytes).unwrap();
            assert!(ApiKeyText::parse(&changed).is_err(), "change at {i} went unnoticed");
        }
    }

    #[test]
    fn malformed_inputs() {
        let key = hasher().generate(KeyMode::Live);
        let text: &str = &key.text;
        assert_eq!(ApiKeyText::parse("").err(), Some(KeyParseError::Malformed));
        assert_eq!(ApiKeyText::parse(&text[..text.len() - 1]).err(), Some(KeyParseError::Malformed));
        assert_eq!(ApiKeyText::parse(&text.replace("pgk_live", "pgk_prod")).err(), Some(KeyParseError::Malformed));
        assert_eq!(ApiKeyText::parse(&text.replacen("pgk_", "xgk_", 1)).err(), Some(KeyParseError::Malformed));
        let multibyte = format!("é{}", &text[2..]);
        assert!(ApiKeyText::parse(&multibyte).is_err());
    }

    #[test]
    fn debug_output_never_contains_the_secret() {
        let key = hasher().generate(KeyMode::Test);
        let parsed = ApiKeyText::parse(&key.text).unwrap();
        let secret = std::str::from_utf8(parsed.secret()).unwrap().to_owned();
        assert!(!format!("{parsed:?}{key:?}").contains(&secret));
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            let _ = ApiKeyText::parse(&s);
        }

        #[test]
        fn parse_never_panics_on_near_keys(s in "pgk_(live|test)_key_[0-9A-Za-z_é]{70,74}") {
            let _ = ApiKeyText::parse(&s);
        }
    }
}
