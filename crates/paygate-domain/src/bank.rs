//! Bank accounts of payees: parsing and validation (IBAN, US ACH), the parts
//! that may be shown (`last4`, the routing number, the country), and the
//! application data key that encrypts the account number and computes its
//! per-company fingerprint (invariant I2).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac};
use iban::IbanLike;
use sha2::Sha256;
use zeroize::{Zeroize, Zeroizing};

use crate::CompanyId;

/// A field problem: JSON pointer (relative to the bank account object) and message.
pub type FieldProblem = (&'static str, String);

/// The bank account as sent by the client (`bank_account` in `POST /v1/payees`).
/// `Debug` never shows the account number or IBAN.
/// The account schemes Paygate accepts, as `bank_account.scheme` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BankScheme {
    Iban,
    UsAch,
}

impl BankScheme {
    pub const ALL: &'static [BankScheme] = &[BankScheme::Iban, BankScheme::UsAch];
}

#[derive(Default, Clone, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BankAccountInput {
    /// `iban` or `us_ach`.
    #[schema(value_type = BankScheme)]
    pub scheme: String,
    /// scheme `iban`: the IBAN, spaces allowed (`DE89 3704 0044 0532 0130 00`).
    pub iban: Option<String>,
    /// scheme `iban`, optional: the bank's BIC (8 or 11 characters).
    pub bic: Option<String>,
    /// scheme `us_ach`: the 9-digit ABA routing number.
    pub routing_number: Option<String>,
    /// scheme `us_ach`: 4–17 digits.
    pub account_number: Option<String>,
    /// scheme `us_ach`: `checking` or `savings`.
    pub account_type: Option<String>,
}

impl std::fmt::Debug for BankAccountInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BankAccountInput").field("scheme", &self.scheme).finish_non_exhaustive()
    }
}

/// A validated bank account. Holds the full account number; drop it once the
/// number is encrypted.
#[derive(Clone, PartialEq, Eq)]
pub enum BankAccount {
    Iban { iban: String, bic: Option<String> },
    UsAch { routing_number: String, account_number: String, account_type: AchAccountType },
}

impl std::fmt::Debug for BankAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BankAccount({} …{})", self.scheme(), self.last4())
    }
}

impl Drop for BankAccount {
    fn drop(&mut self) {
        match self {
            Self::Iban { iban, .. } => iban.zeroize(),
            Self::UsAch { account_number, .. } => account_number.zeroize(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AchAccountType {
    Checking,
    Savings,
}

/// What may be shown and stored in clear about an account.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct BankAccountDetails {
    /// `iban` or `us_ach`.
    pub scheme: String,
    /// scheme `iban`: the IBAN's country.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub country: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bic: Option<String>,
    /// scheme `us_ach`: the bank's routing number (public information).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub routing_number: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_type: Option<AchAccountType>,
    /// The last four characters of the account number (IBAN or ACH account).
    pub last4: String,
    /// A keyed hash of the account: equal for the same account within one
    /// company, unrelated across companies. Use it to find duplicate payees.
    pub fingerprint: String,
}

impl BankAccount {
    /// Validates every field; problems carry a pointer relative to the account object.
    pub fn parse(input: &BankAccountInput) -> Result<Self, Vec<FieldProblem>> {
        let mut problems = Vec::new();
        let unexpected = |problems: &mut Vec<FieldProblem>, name: &'static str, present: bool, scheme: &str| {
            if present {
                problems.push((name, format!("is not a field of scheme {scheme}")));
            }
        };
        match input.scheme.as_str() {
            "iban" => {
                unexpected(&mut problems, "/routing_number", input.routing_number.is_some(), "iban");
                unexpected(&mut problems, "/account_number", input.account_number.is_some(), "iban");
                unexpected(&mut problems, "/account_type", input.account_type.is_some(), "iban");
                let iban = match input.iban.as_deref() {
                    None => {
                        problems.push(("/iban", "is required for scheme iban".into()));
                        None
                    }
                    Some(text) => parse_iban(text).map_err(|e| problems.push(("/iban", e))).ok(),
                };
                let bic = match input.bic.as_deref() {
                    None => None,
                    Some(text) => match parse_bic(text) {
                        Ok(bic) => Some(bic),
                        Err(e) => {
                            problems.push(("/bic", e));
                            None
                        }
                    },
                };
                match iban {
                    Some(iban) if problems.is_empty() => Ok(Self::Iban { iban, bic }),
                    _ => Err(problems),
                }
            }
            "us_ach" => {
                unexpected(&mut problems, "/iban", input.iban.is_some(), "us_ach");
                unexpected(&mut problems, "/bic", input.bic.is_some(), "us_ach");
                let routing = match input.routing_number.as_deref() {
                    None => Err("is required for scheme us_ach".to_owned()),
                    Some(t) => parse_routing_number(t),
                }
                .map_err(|e| problems.push(("/routing_number", e)))
                .ok();
                let account = match input.account_number.as_deref() {
                    None => Err("is required for scheme us_ach".to_owned()),
                    Some(t) if (4..=17).contains(&t.len()) && t.bytes().all(|b| b.is_ascii_digit()) => Ok(t.to_owned()),
                    Some(_) => Err("must be 4 to 17 digits".to_owned()),
                }
                .map_err(|e| problems.push(("/account_number", e)))
                .ok();
                let kind = match input.account_type.as_deref() {
                    Some("checking") => Some(AchAccountType::Checking),
                    Some("savings") => Some(AchAccountType::Savings),
                    Some(_) => {
                        problems.push(("/account_type", "must be checking or savings".into()));
                        None
                    }
                    None => {
                        problems.push(("/account_type", "is required for scheme us_ach".into()));
                        None
                    }
                };
                match (routing, account, kind) {
                    (Some(routing_number), Some(account_number), Some(account_type)) if problems.is_empty() => {
                        Ok(Self::UsAch { routing_number, account_number, account_type })
                    }
                    _ => Err(problems),
                }
            }
            _ => Err(vec![("/scheme", "must be iban or us_ach".into())]),
        }
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Self::Iban { .. } => "iban",
            Self::UsAch { .. } => "us_ach",
        }
    }

    /// The account number that is kept only encrypted: the whole IBAN, or the
    /// ACH account number.
    pub fn secret(&self) -> &str {
        match self {
            Self::Iban { iban, .. } => iban,
            Self::UsAch { account_number, .. } => account_number,
        }
    }

    pub fn last4(&self) -> String {
        let s = self.secret();
        s[s.len().saturating_sub(4)..].to_owned()
    }

    /// What identifies the account for the fingerprint: scheme, bank and number.
    fn identity(&self) -> Zeroizing<String> {
        Zeroizing::new(match self {
            Self::Iban { iban, .. } => format!("iban:{iban}"),
            Self::UsAch { routing_number, account_number, .. } => format!("us_ach:{routing_number}:{account_number}"),
        })
    }

    pub fn details(&self, fingerprint: String) -> BankAccountDetails {
        let (country, bic, routing_number, account_type) = match self {
            Self::Iban { iban, bic } => (Some(iban[..2].to_owned()), bic.clone(), None, None),
            Self::UsAch { routing_number, account_type, .. } => {
                (None, None, Some(routing_number.clone()), Some(*account_type))
            }
        };
        BankAccountDetails {
            scheme: self.scheme().to_owned(),
            country,
            bic,
            routing_number,
            account_type,
            last4: self.last4(),
            fingerprint,
        }
    }
}

fn parse_iban(text: &str) -> Result<String, String> {
    // Accept the print format (groups of four separated by spaces) and lower case.
    let compact: String = text.chars().filter(|c| *c != ' ').collect::<String>().to_ascii_uppercase();
    if compact.is_empty() || compact.len() > 34 || !compact.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err("must be an IBAN: a country code, 2 check digits and up to 30 letters or digits".into());
    }
    match compact.parse::<iban::Iban>() {
        Ok(iban) => Ok(iban.electronic_str().to_owned()),
        Err(iban::ParseIbanError::InvalidBban(_)) => {
            Err("does not match the account format of its country (length or characters)".into())
        }
        Err(iban::ParseIbanError::UnknownCountry(_)) => Err("has a country code that does not use IBANs".into()),
        Err(iban::ParseIbanError::InvalidBaseIban { .. }) => {
            Err("is not a valid IBAN (wrong length for its country or check digits fail mod-97)".into())
        }
    }
}

fn parse_bic(text: &str) -> Result<String, String> {
    let bic = text.trim().to_ascii_uppercase();
    let b = bic.as_bytes();
    let ok = (b.len() == 8 || b.len() == 11)
        && b[..6].iter().all(u8::is_ascii_uppercase)
        && b[6..].iter().all(u8::is_ascii_alphanumeric);
    if ok {
        Ok(bic)
    } else {
        Err("must be a BIC: 4 letters (bank), 2 letters (country), 2 and optionally 3 more letters or digits".into())
    }
}

/// Nine digits, a Federal Reserve prefix (00–12, 21–32, 61–72, 80) and the ABA
/// checksum 3·(d1+d4+d7) + 7·(d2+d5+d8) + (d3+d6+d9) ≡ 0 (mod 10).
fn parse_routing_number(text: &str) -> Result<String, String> {
    if text.len() != 9 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err("must be 9 digits".into());
    }
    let d: Vec<u32> = text.bytes().map(|b| (b - b'0') as u32).collect();
    let prefix = d[0] * 10 + d[1];
    if !matches!(prefix, 0..=12 | 21..=32 | 61..=72 | 80) {
        return Err("does not start with a valid Federal Reserve routing symbol".into());
    }
    let sum = 3 * (d[0] + d[3] + d[6]) + 7 * (d[1] + d[4] + d[7]) + (d[2] + d[5] + d[8]);
    if !sum.is_multiple_of(10) {
        return Err("fails the ABA routing number checksum".into());
    }
    Ok(text.to_owned())
}

/// The application data key: 32 bytes from a file or the configuration. Two
/// keys are derived from it, one per purpose: a ChaCha20-Poly1305 key for
/// account numbers and an HMAC key for fingerprints.
pub struct DataKey {
    cipher: ChaCha20Poly1305,
    fingerprint: Hmac<Sha256>,
    /// Webhook signing secrets: a key of their own, so a ciphertext of one
    /// kind can never be opened as the other.
    secrets: ChaCha20Poly1305,
}

#[derive(Debug, thiserror::Error)]
#[error("bank account ciphertext does not decrypt with this data key (wrong key, or moved between rows)")]
pub struct DecryptError;

const SEALED_VERSION: u8 = 1;

impl DataKey {
    pub const MIN_BYTES: usize = 32;

    pub fn new(master: &[u8]) -> Option<Self> {
        if master.len() < Self::MIN_BYTES {
            return None;
        }
        let derive = |purpose: &[u8]| {
            let mut mac = <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(master).expect("HMAC takes any key length");
            mac.update(purpose);
            Zeroizing::new(<[u8; 32]>::from(mac.finalize().into_bytes()))
        };
        let enc = derive(b"paygate/bank-account-encryption/v1");
        let fp = derive(b"paygate/bank-account-fingerprint/v1");
        let secrets = derive(b"paygate/webhook-secret-encryption/v1");
        Some(Self {
            cipher: ChaCha20Poly1305::new_from_slice(enc.as_slice()).expect("32-byte key"),
            secrets: ChaCha20Poly1305::new_from_slice(secrets.as_slice()).expect("32-byte key"),
            fingerprint: <Hmac<Sha256> as hmac::KeyInit>::new_from_slice(fp.as_slice()).expect("any key length"),
        })
    }

    /// Encrypts the account number, bound to its company and payee (the
    /// associated data): a ciphertext copied to another row does not decrypt.
    /// Layout: version byte, 12-byte random nonce, ciphertext with tag.
    pub fn seal(&self, account: &BankAccount, company: CompanyId, owner_id: &str) -> Vec<u8> {
        seal_with(&self.cipher, account.secret().as_bytes(), &format!("{company}/{owner_id}"))
    }

    pub fn open(&self, sealed: &[u8], company: CompanyId, owner_id: &str) -> Result<Zeroizing<String>, DecryptError> {
        let plain = open_with(&self.cipher, sealed, &format!("{company}/{owner_id}"))?;
        String::from_utf8(plain.to_vec()).map(Zeroizing::new).map_err(|_| DecryptError)
    }

    /// Encrypts a webhook signing secret, bound to its company and endpoint.
    pub fn seal_webhook_secret(&self, secret: &[u8], company: CompanyId, endpoint_id: &str) -> Vec<u8> {
        seal_with(&self.secrets, secret, &format!("{company}/{endpoint_id}"))
    }

    pub fn open_webhook_secret(
        &self,
        sealed: &[u8],
        company: CompanyId,
        endpoint_id: &str,
    ) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
        open_with(&self.secrets, sealed, &format!("{company}/{endpoint_id}"))
    }

    /// `fp_` + 32 hex characters of HMAC(fingerprint key, company ‖ mode ‖
    /// account): test-mode payees (which anyone with a test key can create)
    /// cannot be used to confirm guesses about live accounts.
    pub fn fingerprint(&self, account: &BankAccount, company: CompanyId, mode: crate::KeyMode) -> String {
        let mut mac = self.fingerprint.clone();
        mac.update(company.as_uuid().as_bytes());
        mac.update(mode.as_str().as_bytes());
        mac.update(account.identity().as_bytes());
        let digest = mac.finalize().into_bytes();
        format!("fp_{}", hex::encode(&digest[..16]))
    }
}

/// Layout: version byte, 12-byte random nonce, ciphertext with tag.
fn seal_with(cipher: &ChaCha20Poly1305, plain: &[u8], aad: &str) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).expect("OS random number generator");
    let sealed = cipher
        .encrypt(&Nonce::from(nonce), Payload { msg: plain, aad: aad.as_bytes() })
        .expect("ChaCha20-Poly1305 encrypts any short message");
    let mut out = Vec::with_capacity(1 + 12 + sealed.len());
    out.push(SEALED_VERSION);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

fn open_with(cipher: &ChaCha20Poly1305, sealed: &[u8], aad: &str) -> Result<Zeroizing<Vec<u8>>, DecryptError> {
    if sealed.len() < 13 || sealed[0] != SEALED_VERSION {
        return Err(DecryptError);
    }
    let nonce = Nonce::try_from(&sealed[1..13]).map_err(|_| DecryptError)?;
    cipher
        .decrypt(&nonce, Payload { msg: &sealed[13..], aad: aad.as_bytes() })
        .map(Zeroizing::new)
        .map_err(|_| DecryptError)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iban(text: &str) -> Result<BankAccount, Vec<FieldProblem>> {
        BankAccount::parse(&BankAccountInput { scheme: "iban".into(), iban: Some(text.into()), ..Default::default() })
    }

    fn ach(routing: &str, account: &str) -> Result<BankAccount, Vec<FieldProblem>> {
        BankAccount::parse(&BankAccountInput {
            scheme: "us_ach".into(),
            routing_number: Some(routing.into()),
            account_number: Some(account.into()),
            account_type: Some("checking".into()),
            ..Default::default()
        })
    }

    #[test]
    fn ibans_are_checked_by_mod_97_and_country_format() {
        let ok = iban("de89 3704 0044 0532 0130 00").unwrap();
        assert_eq!(ok.secret(), "DE89370400440532013000");
        assert_eq!(ok.last4(), "3000");
        assert!(iban("GB82WEST12345698765432").is_ok());
        assert!(iban("FR1420041010050500013M02606").is_ok());
        // One digit changed: mod-97 fails.
        assert_eq!(iban("DE89370400440532013001").unwrap_err()[0].0, "/iban");
        // Right checksum shape but a country that does not use IBANs.
        assert!(iban("US64SVBKUS6S3300958879").is_err());
        // Too short for Germany.
        assert!(iban("DE8937040044053201300").is_err());
        assert!(iban("").is_err());
        assert!(iban("DE89-3704").is_err());
    }

    #[test]
    fn routing_numbers_need_the_aba_checksum() {
        assert!(ach("011000015", "123456789").is_ok());
        assert!(ach("021000021", "0001").is_ok());
        assert!(ach("021000022", "123456789").is_err());
        assert!(ach("12345678", "123456789").is_err());
        assert!(ach("990000000", "123456789").is_err(), "invalid Federal Reserve prefix");
        assert!(ach("021000021", "123").is_err());
        assert!(ach("021000021", "123456789012345678").is_err());
        assert!(ach("021000021", "12345x789").is_err());
    }

    #[test]
    fn fields_of_the_other_scheme_are_refused_with_pointers() {
        let problems = BankAccount::parse(&BankAccountInput {
            scheme: "iban".into(),
            iban: Some("DE89370400440532013000".into()),
            routing_number: Some("021000021".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(problems[0].0, "/routing_number");
        let missing =
            BankAccount::parse(&BankAccountInput { scheme: "us_ach".into(), ..Default::default() }).unwrap_err();
        let pointers: Vec<_> = missing.iter().map(|p| p.0).collect();
        assert_eq!(pointers, ["/routing_number", "/account_number", "/account_type"]);
        assert_eq!(BankAccount::parse(&BankAccountInput::default()).unwrap_err()[0].0, "/scheme");
    }

    #[test]
    fn sealed_numbers_open_only_for_their_row_and_fingerprints_are_per_company() {
        const T: crate::KeyMode = crate::KeyMode::Test;
        let key = DataKey::new(&[7u8; 32]).unwrap();
        let account = iban("DE89370400440532013000").unwrap();
        let (a, b) = (CompanyId::generate(), CompanyId::generate());
        let sealed = key.seal(&account, a, "pye_1");
        assert!(!sealed.windows(4).any(|w| w == b"3704"), "no clear digits");
        assert_eq!(key.open(&sealed, a, "pye_1").unwrap().as_str(), "DE89370400440532013000");
        assert!(key.open(&sealed, a, "pye_2").is_err());
        assert!(key.open(&sealed, b, "pye_1").is_err());
        assert!(DataKey::new(&[8u8; 32]).unwrap().open(&sealed, a, "pye_1").is_err());
        assert_eq!(
            key.fingerprint(&account, a, T),
            key.fingerprint(&iban("DE89 3704 0044 0532 0130 00").unwrap(), a, T)
        );
        assert_ne!(key.fingerprint(&account, a, T), key.fingerprint(&account, b, T));
        assert_ne!(key.fingerprint(&account, a, T), key.fingerprint(&account, a, crate::KeyMode::Live));
        assert!(DataKey::new(&[1u8; 31]).is_none());
    }

    #[test]
    fn webhook_secrets_are_sealed_apart_from_accounts() {
        let key = DataKey::new(&[7u8; 32]).unwrap();
        let (a, b) = (CompanyId::generate(), CompanyId::generate());
        let sealed = key.seal_webhook_secret(b"0123456789abcdef0123456789abcdef", a, "we_1");
        assert_eq!(&key.open_webhook_secret(&sealed, a, "we_1").unwrap()[..], b"0123456789abcdef0123456789abcdef");
        assert!(key.open_webhook_secret(&sealed, b, "we_1").is_err());
        assert!(key.open_webhook_secret(&sealed, a, "we_2").is_err());
        // The account cipher cannot open it either.
        assert!(key.open(&sealed, a, "we_1").is_err());
    }
}
