//! Webhooks: Standard Webhooks signing secrets and signatures, the address
//! policy that keeps deliveries away from internal networks, endpoint URLs and
//! the retry schedule. Pure: no IO (hostnames are resolved by the server's
//! webhook client, which applies the same [`AddressPolicy`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use ipnet::IpNet;
use sha2::Sha256;
use subtle::{Choice, ConstantTimeEq};
use zeroize::Zeroizing;

// ---------------------------------------------------------------------------
// Secrets and signatures (https://www.standardwebhooks.com/, symmetric "v1")
// ---------------------------------------------------------------------------

/// The text prefix of a signing secret.
pub const SECRET_PREFIX: &str = "whsec_";
/// Length of a generated secret.
pub const SECRET_LEN: usize = 32;
/// Shortest secret accepted when parsing (the Standard Webhooks test vector's secret is 24 bytes).
pub const MIN_SECRET_LEN: usize = 24;
/// Longest secret accepted when parsing.
pub const MAX_SECRET_LEN: usize = 64;

/// The version tag of the only signature scheme Paygate emits and checks.
const SIGNATURE_VERSION: &str = "v1";
/// HMAC-SHA256 output length.
const TAG_LEN: usize = 32;

/// A Standard Webhooks signing secret: random bytes, text form `whsec_` + standard base64 (with padding).
/// Generated secrets are 32 bytes; parsing accepts 24..=64 bytes.
#[derive(Clone)]
pub struct WebhookSecret(Zeroizing<Vec<u8>>);

impl WebhookSecret {
    /// 32 bytes from the OS CSPRNG.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new(vec![0u8; SECRET_LEN]);
        getrandom::fill(&mut bytes[..]).expect("the OS CSPRNG is available");
        Self(bytes)
    }

    /// `whsec_<standard base64>`; the decoded secret must be 24..=64 bytes.
    pub fn parse(text: &str) -> Option<Self> {
        let encoded = text.strip_prefix(SECRET_PREFIX)?;
        // 64 bytes encode to 88 characters; refuse anything longer before allocating.
        if encoded.is_empty() || encoded.len() > MAX_SECRET_LEN.div_ceil(3) * 4 {
            return None;
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(encoded.len()));
        STANDARD.decode_vec(encoded, &mut bytes).ok()?;
        Self::check_len(bytes.len()).then_some(Self(bytes))
    }

    /// The raw secret; 24..=64 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Self::check_len(bytes.len()).then(|| Self(Zeroizing::new(bytes.to_vec())))
    }

    fn check_len(len: usize) -> bool {
        (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&len)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// `whsec_…`, the form shown to the integrator once.
    pub fn to_text(&self) -> Zeroizing<String> {
        // Reserve the exact length so the buffer never reallocates and leaves a copy behind.
        let mut text = Zeroizing::new(String::with_capacity(SECRET_PREFIX.len() + self.0.len().div_ceil(3) * 4));
        text.push_str(SECRET_PREFIX);
        STANDARD.encode_string(&self.0[..], &mut text);
        text
    }

    fn tag(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC accepts any key length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(…)")
    }
}

/// `v1,<base64 HMAC-SHA256(secret, "{msg_id}.{timestamp}.{body}")>`.
pub fn sign(secret: &WebhookSecret, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = secret.tag(msg_id, timestamp, body);
    let mut out = String::with_capacity(SIGNATURE_VERSION.len() + 1 + 44);
    out.push_str(SIGNATURE_VERSION);
    out.push(',');
    STANDARD.encode_string(tag, &mut out);
    out
}

/// The `webhook-signature` header value: one `v1,…` per secret, space-separated,
/// in the given order (new secret first during rotation).
pub fn signature_header(secrets: &[&WebhookSecret], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|s| sign(s, msg_id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("the signing secret is not a whsec_ secret")]
    InvalidSecret,
    #[error("the webhook-timestamp header is not a Unix timestamp in seconds")]
    InvalidTimestamp,
    #[error("the webhook-timestamp header is too far from the current time")]
    TimestampOutOfTolerance,
    #[error("no signature in the webhook-signature header matches")]
    NoMatchingSignature,
}

/// What an integrator runs on a delivery: the timestamp must be within
/// `tolerance_secs` of `now_unix` (either direction) and ANY of the
/// space-separated `v1,` signatures must match (constant-time compare).
/// Signatures of other versions are ignored.
pub fn verify(
    secret_text: &str,
    msg_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let secret = WebhookSecret::parse(secret_text.trim()).ok_or(VerifyError::InvalidSecret)?;
    verify_with_secret(&secret, msg_id, timestamp_header, signature_header, body, now_unix, tolerance_secs)
}

/// [`verify`] with an already parsed secret.
pub fn verify_with_secret(
    secret: &WebhookSecret,
    msg_id: &str,
    timestamp_header: &str,
    signature_header: &str,
    body: &[u8],
    now_unix: i64,
    tolerance_secs: i64,
) -> Result<(), VerifyError> {
    let timestamp = parse_timestamp(timestamp_header).ok_or(VerifyError::InvalidTimestamp)?;
    if now_unix.abs_diff(timestamp) > tolerance_secs.max(0).unsigned_abs() {
        return Err(VerifyError::TimestampOutOfTolerance);
    }
    let expected = secret.tag(msg_id, timestamp, body);
    let mut matched = Choice::from(0);
    for candidate in signature_header.split_ascii_whitespace() {
        let Some((version, encoded)) = candidate.split_once(',') else { continue };
        if version != SIGNATURE_VERSION {
            continue;
        }
        let mut decoded = [0u8; TAG_LEN + 3];
        match STANDARD.decode_slice(encoded, &mut decoded) {
            Ok(TAG_LEN) => matched |= decoded[..TAG_LEN].ct_eq(&expected),
            _ => continue,
        }
    }
    if bool::from(matched) { Ok(()) } else { Err(VerifyError::NoMatchingSignature) }
}

/// Decimal digits only (no sign, no spaces inside), at most 19 of them.
fn parse_timestamp(text: &str) -> Option<i64> {
    let text = text.trim();
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

// ---------------------------------------------------------------------------
// Address policy
// ---------------------------------------------------------------------------

/// Why an address is not a public unicast address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    Loopback,
    Private,
    LinkLocal,
    /// Cloud instance metadata services (169.254.169.254, fd00:ec2::254, 100.100.100.200, 168.63.129.16).
    Metadata,
    Unspecified,
    /// 100.64.0.0/10 (carrier-grade NAT).
    SharedAddressSpace,
    Multicast,
    Broadcast,
    Reserved,
    Documentation,
}

impl AddressClass {
    /// Stable snake_case name for logs, metrics and error details.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link_local",
            Self::Metadata => "metadata",
            Self::Unspecified => "unspecified",
            Self::SharedAddressSpace => "shared_address_space",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
            Self::Documentation => "documentation",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local",
            Self::Metadata => "cloud metadata",
            Self::Unspecified => "unspecified",
            Self::SharedAddressSpace => "shared (carrier-grade NAT)",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
            Self::Documentation => "documentation",
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0} address")]
pub struct ForbiddenAddress(pub AddressClass);

/// Networks webhook deliveries may never reach unless the operator allow-lists them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    allowed: Vec<IpNet>,
}

impl AddressPolicy {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self { allowed: allowed.into_iter().map(|n| n.trunc()).collect() }
    }

    pub fn allowed(&self) -> &[IpNet] {
        &self.allowed
    }

    /// Ok if `ip` is a public unicast address, or inside an allow-listed
    /// network (an IPv6 address embedding an IPv4 one is also permitted when
    /// the embedded address is allow-listed). Err names the class.
    ///
    /// A cloud metadata address is permitted only when allow-listed as a
    /// single host: allowing `169.254.0.0/16` or `fd00::/8` for an internal
    /// receiver must not open the instance's credentials to every tenant.
    pub fn check(&self, ip: IpAddr) -> Result<(), ForbiddenAddress> {
        let class = classify(ip);
        let exact = class == Some(AddressClass::Metadata);
        if self.is_allow_listed(ip, exact) {
            return Ok(());
        }
        if let IpAddr::V6(v6) = ip
            && let Some(v4) = embedded_ipv4(v6)
            && self.is_allow_listed(IpAddr::V4(v4), exact)
        {
            return Ok(());
        }
        match class {
            None => Ok(()),
            Some(class) => Err(ForbiddenAddress(class)),
        }
    }

    fn is_allow_listed(&self, ip: IpAddr, single_host_only: bool) -> bool {
        self.allowed
            .iter()
            .any(|net| net.contains(&ip) && (!single_host_only || net.prefix_len() == net.max_prefix_len()))
    }
}

/// The class of a non-public address; None for a public unicast address.
/// IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4)
/// are judged by the embedded address.
pub fn classify(ip: IpAddr) -> Option<AddressClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u8) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    (u32::from(ip) & mask) == (u32::from(Ipv4Addr::from(net)) & mask)
}

fn in_v6(ip: Ipv6Addr, net: [u16; 8], prefix: u8) -> bool {
    let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
    let net = Ipv6Addr::new(net[0], net[1], net[2], net[3], net[4], net[5], net[6], net[7]);
    (u128::from(ip) & mask) == (u128::from(net) & mask)
}

fn classify_v4(ip: Ipv4Addr) -> Option<AddressClass> {
    use AddressClass::*;
    // Most specific first: metadata addresses sit inside link-local, shared and public space.
    const METADATA: [[u8; 4]; 3] = [[169, 254, 169, 254], [100, 100, 100, 200], [168, 63, 129, 16]];
    if METADATA.iter().any(|m| ip.octets() == *m) {
        return Some(Metadata);
    }
    if ip == Ipv4Addr::BROADCAST {
        return Some(Broadcast);
    }
    const TABLE: &[([u8; 4], u8, AddressClass)] = &[
        ([0, 0, 0, 0], 8, Unspecified),
        ([127, 0, 0, 0], 8, Loopback),
        ([10, 0, 0, 0], 8, Private),
        ([172, 16, 0, 0], 12, Private),
        ([192, 168, 0, 0], 16, Private),
        ([169, 254, 0, 0], 16, LinkLocal),
        ([100, 64, 0, 0], 10, SharedAddressSpace),
        ([192, 0, 2, 0], 24, Documentation),
        ([198, 51, 100, 0], 24, Documentation),
        ([203, 0, 113, 0], 24, Documentation),
        ([192, 0, 0, 0], 24, Reserved),
        ([192, 88, 99, 0], 24, Reserved),
        ([198, 18, 0, 0], 15, Reserved),
        ([224, 0, 0, 0], 4, Multicast),
        ([240, 0, 0, 0], 4, Reserved),
    ];
    TABLE.iter().find(|(net, prefix, _)| in_v4(ip, *net, *prefix)).map(|(_, _, class)| *class)
}

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`), IPv4-compatible
/// (`::a.b.c.d`, not `::` or `::1`), NAT64 (`64:ff9b::/96`) or 6to4 (`2002::/16`) address.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if bits >> 32 == 0 && bits > 1 {
        return Some(low32);
    }
    if in_v6(ip, [0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96) {
        return Some(low32);
    }
    if in_v6(ip, [0x2002, 0, 0, 0, 0, 0, 0, 0], 16) {
        return Some(Ipv4Addr::from((bits >> 80) as u32));
    }
    None
}

fn classify_v6(ip: Ipv6Addr) -> Option<AddressClass> {
    use AddressClass::*;
    if ip.is_unspecified() {
        return Some(Unspecified);
    }
    if ip.is_loopback() {
        return Some(Loopback);
    }
    // AWS's IPv6 instance metadata service, inside fc00::/7.
    if ip == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
        return Some(Metadata);
    }
    if let Some(v4) = embedded_ipv4(ip) {
        return classify_v4(v4);
    }
    const TABLE: &[([u16; 8], u8, AddressClass)] = &[
        ([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7, Private),
        ([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10, Private), // deprecated site-local
        ([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10, LinkLocal),
        ([0xff00, 0, 0, 0, 0, 0, 0, 0], 8, Multicast),
        ([0x2001, 0x0db8, 0, 0, 0, 0, 0, 0], 32, Documentation),
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20, Documentation),
        ([0x0064, 0xff9b, 0x0001, 0, 0, 0, 0, 0], 48, Reserved), // local-use NAT64: the embedded address's position varies
        ([0x0100, 0, 0, 0, 0, 0, 0, 0], 64, Reserved),           // discard-only
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 32, Reserved),           // Teredo
        ([0x2001, 0x0002, 0, 0, 0, 0, 0, 0], 48, Reserved),      // benchmarking
        ([0x2001, 0x0010, 0, 0, 0, 0, 0, 0], 28, Reserved),      // ORCHID
    ];
    if let Some((_, _, class)) = TABLE.iter().find(|(net, prefix, _)| in_v6(ip, *net, *prefix)) {
        return Some(*class);
    }
    // Global unicast is 2000::/3; everything else is unallocated or special.
    if !in_v6(ip, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        return Some(Reserved);
    }
    None
}

// ---------------------------------------------------------------------------
// Endpoint URLs
// ---------------------------------------------------------------------------

/// Longest accepted endpoint URL, in characters.
pub const MAX_URL_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("not a valid URL: {0}")]
    Invalid(String),
    #[error("the URL must use https:// (http:// is accepted only for test-mode endpoints; live mode requires https)")]
    SchemeNotAllowed,
    #[error("the URL must not contain a user name or password")]
    Credentials,
    #[error("the URL must not contain a fragment (#…)")]
    Fragment,
    #[error("the URL is longer than {MAX_URL_LEN} characters")]
    TooLong,
    #[error("the URL points to a {0} address, which webhook deliveries may not reach")]
    Forbidden(AddressClass),
}

impl UrlError {
    /// The stable problem+json `code`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) | Self::Credentials | Self::Fragment | Self::TooLong => "invalid_url",
            Self::SchemeNotAllowed => "url_scheme_not_allowed",
            Self::Forbidden(_) => "url_not_allowed",
        }
    }
}

/// A webhook endpoint URL as accepted at creation / update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointUrl(url::Url);

impl EndpointUrl {
    /// `https://` always; `http://` only when `allow_http` (test-mode keys). No
    /// userinfo, a host, no fragment, at most 2048 characters, any port but 0.
    /// An IP-literal host must pass `policy.check`; `localhost` and
    /// `*.localhost` are refused as loopback unless the policy allow-lists
    /// 127.0.0.1. Other hostnames are NOT resolved here: the webhook client
    /// checks every resolved address at connection time.
    pub fn parse(text: &str, allow_http: bool, policy: &AddressPolicy) -> Result<Self, UrlError> {
        if text.chars().count() > MAX_URL_LEN {
            return Err(UrlError::TooLong);
        }
        let url = url::Url::parse(text).map_err(|e| UrlError::Invalid(e.to_string()))?;
        match url.scheme() {
            "https" => {}
            "http" if allow_http => {}
            _ => return Err(UrlError::SchemeNotAllowed),
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlError::Credentials);
        }
        if url.fragment().is_some() {
            return Err(UrlError::Fragment);
        }
        if url.port() == Some(0) {
            return Err(UrlError::Invalid("port 0 is not a valid port".into()));
        }
        match url.host() {
            None => return Err(UrlError::Invalid("a host is required".into())),
            Some(url::Host::Ipv4(v4)) => policy.check(IpAddr::V4(v4)).map_err(|e| UrlError::Forbidden(e.0))?,
            Some(url::Host::Ipv6(v6)) => policy.check(IpAddr::V6(v6)).map_err(|e| UrlError::Forbidden(e.0))?,
            Some(url::Host::Domain(domain)) => {
                if is_localhost(domain) {
                    policy
                        .check(IpAddr::V4(Ipv4Addr::LOCALHOST))
                        .map_err(|_| UrlError::Forbidden(AddressClass::Loopback))?;
                }
            }
        }
        // Normalisation (percent-encoding, IDNA) can lengthen the text.
        if url.as_str().chars().count() > MAX_URL_LEN {
            return Err(UrlError::TooLong);
        }
        Ok(Self(url))
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &url::Url {
        &self.0
    }
}

impl fmt::Display for EndpointUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `localhost`, `*.localhost`, with or without the trailing dot (RFC 6761: always loopback).
pub fn is_localhost(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

// ---------------------------------------------------------------------------
// Retry schedule
// ---------------------------------------------------------------------------

/// The default schedule: eight attempts over about a day.
pub const DEFAULT_RETRY_SCHEDULE: &str = "0s,5s,5m,30m,2h,5h,10h,10h";
pub const MAX_RETRY_ATTEMPTS: usize = 20;
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(7 * 86_400);

/// Retry schedule: the delay before each attempt; attempt 1 is index 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrySchedule(Vec<Duration>);

impl RetrySchedule {
    /// Comma-separated delays such as `0s,5s,5m,30m,2h,5h,10h,10h`; units ms, s,
    /// m, h, d; 1..=20 entries, each at most 7 days.
    pub fn parse(text: &str) -> Result<Self, String> {
        let delays = text.split(',').map(|entry| parse_delay(entry.trim())).collect::<Result<Vec<_>, _>>()?;
        if delays.len() > MAX_RETRY_ATTEMPTS {
            return Err(format!("at most {MAX_RETRY_ATTEMPTS} attempts, got {}", delays.len()));
        }
        Ok(Self(delays))
    }

    pub fn attempts(&self) -> u32 {
        self.0.len() as u32
    }

    /// Delay before attempt `n` (1-based); None when there is no such attempt (give up).
    pub fn delay_before(&self, n: u32) -> Option<Duration> {
        let index = usize::try_from(n.checked_sub(1)?).ok()?;
        self.0.get(index).copied()
    }

    pub fn delays(&self) -> &[Duration] {
        &self.0
    }
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self::parse(DEFAULT_RETRY_SCHEDULE).expect("the default schedule parses")
    }
}

/// Canonical text, parseable by [`RetrySchedule::parse`]: each delay in its largest exact unit.
impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, delay) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            let ms = delay.as_millis();
            let (n, unit) = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1_000, "s")]
                .into_iter()
                .find(|(size, _)| ms > 0 && ms % size == 0)
                .map(|(size, unit)| (ms / size, unit))
                .unwrap_or(if ms == 0 { (0, "s") } else { (ms, "ms") });
            write!(f, "{n}{unit}")?;
        }
        Ok(())
    }
}

/// One delay, in the duration syntax the CLI and configuration share.
fn parse_delay(entry: &str) -> Result<Duration, String> {
    let delay = crate::duration::parse_span(entry).map_err(|e| e.to_string())?;
    if delay > MAX_RETRY_DELAY {
        return Err(format!("delay {entry:?} is longer than 7 days"));
    }
    Ok(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    // The official Standard Webhooks test vector, from the "sign function works"
    // test in standard-webhooks/standard-webhooks,
    // libraries/javascript/src/webhook.test.ts.
    const VECTOR_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const VECTOR_MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const VECTOR_TIMESTAMP: i64 = 1614265330;
    const VECTOR_PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
    const VECTOR_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    const TOLERANCE: i64 = 300;

    fn vector_secret() -> WebhookSecret {
        WebhookSecret::parse(VECTOR_SECRET).expect("the vector secret parses")
    }

    #[test]
    fn webhook_sign_matches_the_standard_webhooks_test_vector() {
        let secret = vector_secret();
        assert_eq!(secret.as_bytes().len(), 24);
        assert_eq!(sign(&secret, VECTOR_MSG_ID, VECTOR_TIMESTAMP, VECTOR_PAYLOAD), VECTOR_SIGNATURE);
        assert_eq!(&*secret.to_text(), VECTOR_SECRET);
    }

    #[test]
    fn webhook_verify_accepts_the_test_vector() {
        let ts = VECTOR_TIMESTAMP.to_string();
        let ok = verify(VECTOR_SECRET, VECTOR_MSG_ID, &ts, VECTOR_SIGNATURE, VECTOR_PAYLOAD, VECTOR_TIMESTAMP, 300);
        assert_eq!(ok, Ok(()));
        // Other versions and garbage around the valid one are ignored.
        let header = format!("v2,abc v1,not-base64 v1,AAAA {VECTOR_SIGNATURE} v1a,xyz");
        let ok = verify(VECTOR_SECRET, VECTOR_MSG_ID, &ts, &header, VECTOR_PAYLOAD, VECTOR_TIMESTAMP + 299, TOLERANCE);
        assert_eq!(ok, Ok(()));
    }

    #[test]
    fn webhook_verify_refuses_tampering_wrong_secret_and_stale_timestamps() {
        let ts = VECTOR_TIMESTAMP.to_string();
        let now = VECTOR_TIMESTAMP;
        let check = |secret: &str, id: &str, ts: &str, sig: &str, body: &[u8], now: i64| {
            verify(secret, id, ts, sig, body, now, TOLERANCE)
        };
        use VerifyError::*;
        let cases: Vec<(&str, Result<(), VerifyError>)> = vec![
            (
                "tampered body",
                check(VECTOR_SECRET, VECTOR_MSG_ID, &ts, VECTOR_SIGNATURE, br#"{"test": 2432232315}"#, now),
            ),
            ("other msg id", check(VECTOR_SECRET, "msg_other", &ts, VECTOR_SIGNATURE, VECTOR_PAYLOAD, now)),
            (
                "wrong secret",
                check(&WebhookSecret::generate().to_text(), VECTOR_MSG_ID, &ts, VECTOR_SIGNATURE, VECTOR_PAYLOAD, now),
            ),
            ("old timestamp", check(VECTOR_SECRET, VECTOR_MSG_ID, &ts, VECTOR_SIGNATURE, VECTOR_PAYLOAD, now + 301)),
            ("future timestamp", check(VECTOR_SECRET, VECTOR_MSG_ID, &ts, VECTOR_SIGNATURE, VECTOR_PAYLOAD, now - 301)),
            ("garbage timestamp", check(VECTOR_SECRET, VECTOR_MSG_ID, "hello", VECTOR_SIGNATURE, VECTOR_PAYLOAD, now)),
            (
                "signed timestamp",
                check(VECTOR_SECRET, VECTOR_MSG_ID, "+1614265330", VECTOR_SIGNATURE, VECTOR_PAYLOAD, now),
            ),
            ("empty signatures", check(VECTOR_SECRET, VECTOR_MSG_ID, &ts, "", VECTOR_PAYLOAD, now)),
            (
                "truncated signature",
                check(VECTOR_SECRET, VECTOR_MSG_ID, &ts, &VECTOR_SIGNATURE[..20], VECTOR_PAYLOAD, now),
            ),
            (
                "v2 only",
                check(VECTOR_SECRET, VECTOR_MSG_ID, &ts, &VECTOR_SIGNATURE.replace("v1,", "v2,"), VECTOR_PAYLOAD, now),
            ),
            (
                "no prefix",
                check("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", VECTOR_MSG_ID, &ts, VECTOR_SIGNATURE, VECTOR_PAYLOAD, now),
            ),
        ];
        let expected = [
            NoMatchingSignature,
            NoMatchingSignature,
            NoMatchingSignature,
            TimestampOutOfTolerance,
            TimestampOutOfTolerance,
            InvalidTimestamp,
            InvalidTimestamp,
            NoMatchingSignature,
            NoMatchingSignature,
            NoMatchingSignature,
            InvalidSecret,
        ];
        for ((name, got), want) in cases.into_iter().zip(expected) {
            assert_eq!(got, Err(want), "{name}");
        }
    }

    #[test]
    fn webhook_rotation_header_verifies_with_either_secret() {
        let new = WebhookSecret::generate();
        let old = vector_secret();
        let now = 1_700_000_000;
        let body = br#"{"type":"payment.settled"}"#;
        let header = signature_header(&[&new, &old], "msg_1", now, body);
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts, [sign(&new, "msg_1", now, body), sign(&old, "msg_1", now, body)]);
        for secret in [&new, &old] {
            assert_eq!(verify(&secret.to_text(), "msg_1", &now.to_string(), &header, body, now, TOLERANCE), Ok(()));
        }
        let stranger = WebhookSecret::generate();
        assert_eq!(
            verify(&stranger.to_text(), "msg_1", &now.to_string(), &header, body, now, TOLERANCE),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn webhook_secrets_round_trip_and_never_print() {
        let secret = WebhookSecret::generate();
        assert_eq!(secret.as_bytes().len(), SECRET_LEN);
        let text = secret.to_text();
        assert!(text.starts_with("whsec_"));
        assert_eq!(WebhookSecret::parse(&text).unwrap().as_bytes(), secret.as_bytes());
        assert_ne!(WebhookSecret::generate().as_bytes(), secret.as_bytes());
        assert_eq!(format!("{secret:?}"), "WebhookSecret(…)");
        assert!(!format!("{secret:?}").contains(&text[6..]));

        assert!(WebhookSecret::from_bytes(&[7; 23]).is_none());
        assert!(WebhookSecret::from_bytes(&[7; 24]).is_some());
        assert!(WebhookSecret::from_bytes(&[7; 64]).is_some());
        assert!(WebhookSecret::from_bytes(&[7; 65]).is_none());
        let long = format!("whsec_{}", STANDARD.encode([1u8; 65]));
        for bad in ["", "whsec_", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_not base64!", "whsec_c2hvcnQ=", &long] {
            assert!(WebhookSecret::parse(bad).is_none(), "{bad}");
        }
    }

    // --- address policy ---

    #[test]
    fn webhook_address_classes_table() {
        use AddressClass::*;
        let cases: &[(&str, Option<AddressClass>)] = &[
            // public
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("2606:4700:4700::1111", None),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::808:808", None),
            ("2002:808:808::1", None),
            // loopback
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("::1", Some(Loopback)),
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::127.0.0.1", Some(Loopback)),
            ("64:ff9b::127.0.0.1", Some(Loopback)),
            ("2002:7f00:1::", Some(Loopback)),
            // private
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("192.168.1.1", Some(Private)),
            ("fc00::1", Some(Private)),
            ("fd12:3456::1", Some(Private)),
            ("fec0::1", Some(Private)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("::ffff:192.168.0.1", Some(Private)),
            ("64:ff9b::a00:1", Some(Private)),
            ("2002:c0a8:101::1", Some(Private)),
            // link-local
            ("169.254.1.1", Some(LinkLocal)),
            ("fe80::1", Some(LinkLocal)),
            ("febf::1", Some(LinkLocal)),
            ("::ffff:169.254.1.1", Some(LinkLocal)),
            // metadata (before link-local / private / shared)
            ("169.254.169.254", Some(Metadata)),
            ("100.100.100.200", Some(Metadata)),
            ("168.63.129.16", Some(Metadata)),
            ("fd00:ec2::254", Some(Metadata)),
            ("::ffff:169.254.169.254", Some(Metadata)),
            ("::169.254.169.254", Some(Metadata)),
            ("64:ff9b::a9fe:a9fe", Some(Metadata)),
            ("2002:a9fe:a9fe::", Some(Metadata)),
            // unspecified
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("::", Some(Unspecified)),
            ("::ffff:0.0.0.0", Some(Unspecified)),
            // shared address space
            ("100.64.0.1", Some(SharedAddressSpace)),
            ("100.127.255.255", Some(SharedAddressSpace)),
            ("::ffff:100.64.0.1", Some(SharedAddressSpace)),
            // multicast
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("ff02::1", Some(Multicast)),
            ("ff0e::1", Some(Multicast)),
            ("::ffff:224.0.0.251", Some(Multicast)),
            // broadcast
            ("255.255.255.255", Some(Broadcast)),
            ("::ffff:255.255.255.255", Some(Broadcast)),
            // reserved
            ("240.0.0.1", Some(Reserved)),
            ("192.0.0.8", Some(Reserved)),
            ("198.18.0.1", Some(Reserved)),
            ("198.19.255.255", Some(Reserved)),
            ("100::1", Some(Reserved)),
            ("2001::1", Some(Reserved)),
            ("2001:2::1", Some(Reserved)),
            ("2001:10::1", Some(Reserved)),
            ("64:ff9b:1::1", Some(Reserved)),
            ("4000::1", Some(Reserved)),
            ("::ffff:240.0.0.1", Some(Reserved)),
            ("::ffff:198.18.0.1", Some(Reserved)),
            // documentation
            ("192.0.2.1", Some(Documentation)),
            ("198.51.100.1", Some(Documentation)),
            ("203.0.113.1", Some(Documentation)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("::ffff:192.0.2.1", Some(Documentation)),
            ("64:ff9b::c000:201", Some(Documentation)),
        ];
        let policy = AddressPolicy::default();
        for (text, want) in cases {
            let ip: IpAddr = text.parse().unwrap();
            assert_eq!(classify(ip), *want, "{text}");
            assert_eq!(policy.check(ip), want.map_or(Ok(()), |c| Err(ForbiddenAddress(c))), "{text}");
        }
    }

    #[test]
    fn webhook_allow_list_permits_forbidden_classes() {
        let policy = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap(), "10.1.0.0/16".parse().unwrap()]);
        for ok in ["127.0.0.1", "::ffff:127.0.0.1", "10.1.2.3", "::ffff:10.1.2.3", "64:ff9b::a01:203", "8.8.8.8"] {
            assert_eq!(policy.check(ok.parse().unwrap()), Ok(()), "{ok}");
        }
        for (bad, class) in [
            ("::1", AddressClass::Loopback),
            ("10.2.0.1", AddressClass::Private),
            ("169.254.169.254", AddressClass::Metadata),
        ] {
            assert_eq!(policy.check(bad.parse().unwrap()), Err(ForbiddenAddress(class)), "{bad}");
        }
        let v6 = AddressPolicy::new(vec!["fd00::/8".parse().unwrap()]);
        assert_eq!(v6.check("fd00::1".parse().unwrap()), Ok(()));
        // Metadata stays refused inside a wider allow-listed network ...
        assert_eq!(v6.check("fd00:ec2::254".parse().unwrap()), Err(ForbiddenAddress(AddressClass::Metadata)));
        let wide = AddressPolicy::new(vec!["169.254.0.0/16".parse().unwrap(), "100.64.0.0/10".parse().unwrap()]);
        assert_eq!(wide.check("169.254.1.1".parse().unwrap()), Ok(()));
        assert_eq!(wide.check("169.254.169.254".parse().unwrap()), Err(ForbiddenAddress(AddressClass::Metadata)));
        assert_eq!(
            wide.check("::ffff:169.254.169.254".parse().unwrap()),
            Err(ForbiddenAddress(AddressClass::Metadata))
        );
        assert_eq!(wide.check("100.100.100.200".parse().unwrap()), Err(ForbiddenAddress(AddressClass::Metadata)));
        // ... and is reachable only when named as a single host.
        let exact = AddressPolicy::new(vec!["169.254.169.254/32".parse().unwrap()]);
        assert_eq!(exact.check("169.254.169.254".parse().unwrap()), Ok(()));
        assert_eq!(v6.check("fc00::1".parse().unwrap()), Err(ForbiddenAddress(AddressClass::Private)));
    }

    #[test]
    fn webhook_address_class_names_are_stable() {
        assert_eq!(AddressClass::LinkLocal.as_str(), "link_local");
        assert_eq!(AddressClass::Metadata.as_str(), "metadata");
        assert_eq!(AddressClass::SharedAddressSpace.as_str(), "shared_address_space");
        assert_eq!(ForbiddenAddress(AddressClass::Loopback).to_string(), "loopback address");
    }

    // --- endpoint URLs ---

    #[test]
    fn webhook_endpoint_urls() {
        let policy = AddressPolicy::default();
        let ok = |t: &str, http: bool| EndpointUrl::parse(t, http, &policy);
        assert_eq!(
            ok("https://hooks.example.com/paygate?x=1", false).unwrap().as_str(),
            "https://hooks.example.com/paygate?x=1"
        );
        assert_eq!(ok("https://HOOKS.example.com:8443", false).unwrap().as_str(), "https://hooks.example.com:8443/");
        assert!(ok("http://hooks.example.com/", true).is_ok());
        assert!(ok("https://8.8.8.8/x", false).is_ok());
        assert!(ok("https://[2606:4700:4700::1111]/x", false).is_ok());

        use AddressClass::*;
        let long = format!("https://example.com/{}", "a".repeat(2048));
        let cases: Vec<(&str, bool, UrlError)> = vec![
            ("http://hooks.example.com/", false, UrlError::SchemeNotAllowed),
            ("ftp://hooks.example.com/", true, UrlError::SchemeNotAllowed),
            ("file:///etc/passwd", true, UrlError::SchemeNotAllowed),
            ("https://user:pass@example.com/", false, UrlError::Credentials),
            ("https://user@example.com/", false, UrlError::Credentials),
            ("https://example.com/#frag", false, UrlError::Fragment),
            ("https://example.com/#", false, UrlError::Fragment),
            (&long, false, UrlError::TooLong),
            ("https://127.0.0.1/", false, UrlError::Forbidden(Loopback)),
            ("https://127.1/", false, UrlError::Forbidden(Loopback)),
            ("https://0x7f000001/", false, UrlError::Forbidden(Loopback)),
            ("https://[::1]:8443/", false, UrlError::Forbidden(Loopback)),
            ("https://[::ffff:127.0.0.1]/", false, UrlError::Forbidden(Loopback)),
            ("https://localhost/", false, UrlError::Forbidden(Loopback)),
            ("https://LOCALHOST./", false, UrlError::Forbidden(Loopback)),
            ("https://api.localhost/", false, UrlError::Forbidden(Loopback)),
            ("https://10.0.0.5/", false, UrlError::Forbidden(Private)),
            ("https://169.254.169.254/latest/meta-data", false, UrlError::Forbidden(Metadata)),
            ("https://[fd00:ec2::254]/", false, UrlError::Forbidden(Metadata)),
            ("https://[fe80::1]/", false, UrlError::Forbidden(LinkLocal)),
            ("https://0.0.0.0/", false, UrlError::Forbidden(Unspecified)),
        ];
        for (text, http, want) in cases {
            assert_eq!(ok(text, http), Err(want), "{text}");
        }
        for bad in ["not a url", "https://", "https://exa mple.com/", "/relative", "https://example.com:0/"] {
            let err = ok(bad, false).unwrap_err();
            assert!(matches!(err, UrlError::Invalid(_)), "{bad}: {err:?}");
            assert_eq!(err.code(), "invalid_url");
        }
        assert_eq!(UrlError::SchemeNotAllowed.code(), "url_scheme_not_allowed");
        assert!(UrlError::SchemeNotAllowed.to_string().contains("live mode requires https"));
        assert_eq!(UrlError::Forbidden(Private).code(), "url_not_allowed");
        assert_eq!(UrlError::Credentials.code(), "invalid_url");
    }

    #[test]
    fn webhook_endpoint_urls_respect_the_allow_list() {
        let policy = AddressPolicy::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(EndpointUrl::parse("http://127.0.0.1:9000/hook", true, &policy).is_ok());
        assert!(EndpointUrl::parse("http://localhost:9000/hook", true, &policy).is_ok());
        assert_eq!(
            EndpointUrl::parse("http://[::1]:9000/hook", true, &policy),
            Err(UrlError::Forbidden(AddressClass::Loopback))
        );
    }

    // --- retry schedule ---

    #[test]
    fn webhook_retry_schedule_default() {
        let s = RetrySchedule::default();
        assert_eq!(s.attempts(), 8);
        assert_eq!(s.delay_before(0), None);
        assert_eq!(s.delay_before(1), Some(Duration::ZERO));
        assert_eq!(s.delay_before(2), Some(Duration::from_secs(5)));
        assert_eq!(s.delay_before(3), Some(Duration::from_secs(300)));
        assert_eq!(s.delay_before(8), Some(Duration::from_secs(36_000)));
        assert_eq!(s.delay_before(9), None);
        assert_eq!(s.to_string(), DEFAULT_RETRY_SCHEDULE);
    }

    #[test]
    fn webhook_retry_schedule_parse() {
        let s = RetrySchedule::parse(" 250ms, 1s ,2m,1h,7d").unwrap();
        assert_eq!(
            s.delays(),
            [
                Duration::from_millis(250),
                Duration::from_secs(1),
                Duration::from_secs(120),
                Duration::from_secs(3600),
                Duration::from_secs(7 * 86_400)
            ]
        );
        assert_eq!(RetrySchedule::parse(&s.to_string()).unwrap(), s);
        assert_eq!(RetrySchedule::parse("1500ms").unwrap().to_string(), "1500ms");
        assert_eq!(RetrySchedule::parse(&vec!["1s"; 20].join(",")).unwrap().attempts(), 20);
        let too_many = vec!["1s"; 21].join(",");
        for bad in [
            "",
            " ",
            "5",
            "s",
            "5x",
            "-1s",
            "1.5s",
            "5s,,5m",
            "5s,",
            "8d",
            "168h1s",
            "169h",
            "99999999999999d",
            &too_many,
        ] {
            assert!(RetrySchedule::parse(bad).is_err(), "{bad:?}");
        }
    }
}
