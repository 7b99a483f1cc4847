//! Client addresses: per-key allow-lists and the trusted-proxy rule for
//! `X-Forwarded-For`.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// At most this many networks per key.
pub const MAX_ALLOWED_CIDRS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IPv4 or IPv6 network such as 203.0.113.0/24 or 2001:db8::/32")]
    Invalid(String),
    #[error("at most {MAX_ALLOWED_CIDRS} networks")]
    TooMany,
}

/// Parses one network; a bare address means a single host (/32 or /128).
/// Host bits are cleared, so `10.1.2.3/8` is stored as `10.0.0.0/8`.
pub fn parse_cidr(text: &str) -> Result<IpNet, CidrError> {
    let text = text.trim();
    let net = match text.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => {
            text.parse::<IpAddr>().map(IpNet::from).map_err(|_| CidrError::Invalid(text.chars().take(64).collect()))?
        }
    };
    Ok(net.trunc())
}

/// A key's client address allow-list. Empty means any address.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct AllowedCidrs(Vec<IpNet>);

impl AllowedCidrs {
    pub fn new(nets: Vec<IpNet>) -> Result<Self, CidrError> {
        if nets.len() > MAX_ALLOWED_CIDRS {
            return Err(CidrError::TooMany);
        }
        let mut nets = nets;
        nets.sort();
        nets.dedup();
        Ok(Self(nets))
    }

    /// Comma- or space-separated list (CLI, storage).
    pub fn parse_list(text: &str) -> Result<Self, CidrError> {
        let nets =
            text.split([',', ' ']).filter(|s| !s.trim().is_empty()).map(parse_cidr).collect::<Result<Vec<_>, _>>()?;
        Self::new(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn permits(&self, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.0.is_empty() || self.0.iter().any(|net| net.contains(&addr))
    }

    /// Whether every address this list permits is also permitted by
    /// `ceiling`: the rule for a key minted by another key. An empty list
    /// (any address) fits only under an empty ceiling.
    pub fn is_within(&self, ceiling: &AllowedCidrs) -> bool {
        ceiling.is_empty() || (!self.is_empty() && self.0.iter().all(|net| ceiling.covers(net)))
    }

    /// Whether one of this list's networks contains all of `net`.
    pub fn covers(&self, net: &IpNet) -> bool {
        self.0.iter().any(|outer| outer.contains(net))
    }

    pub fn iter(&self) -> impl Iterator<Item = &IpNet> {
        self.0.iter()
    }

    pub fn to_storage(&self) -> String {
        self.0.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(" ")
    }
}

impl fmt::Debug for AllowedCidrs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.iter().map(|n| n.to_string())).finish()
    }
}

impl serde::Serialize for AllowedCidrs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(|n| n.to_string()))
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`, as a dual-stack listener
/// reports IPv4 peers) compare as the IPv4 address.
pub fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
        v4 => v4,
    }
}

/// The client a limit or an aggregate counts: the address itself for IPv4,
/// its /64 for IPv6 (one subscriber usually holds a whole /64).
pub fn client_bucket(addr: IpAddr) -> String {
    ClientBucket(addr).to_string()
}

/// [`client_bucket`] as a `Display`, for writing it into a buffer without a
/// `String` of its own (the limiter formats it on every request).
#[derive(Debug, Clone, Copy)]
pub struct ClientBucket(pub IpAddr);

impl std::fmt::Display for ClientBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match canonical(self.0) {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                write!(f, "{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        }
    }
}

/// One `X-Forwarded-For` hop: an address, `ip:port`, or `[v6]:port`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(addr) = hop.parse::<IpAddr>() {
        return Some(addr);
    }
    if let Ok(sock) = hop.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    hop.strip_prefix('[').and_then(|h| h.strip_suffix(']')).and_then(|h| h.parse().ok())
}

/// The client address of a request: the TCP peer, unless the peer is a trusted
/// proxy, in which case `X-Forwarded-For` is walked from the right, skipping
/// trusted proxies, and the first untrusted hop is the client. A header from an
/// untrusted peer changes nothing. An unparsable hop, or a chain of trusted
/// proxies only, makes the client unknown: the unspecified address, which no
/// allow-list entry (except 0.0.0.0/0) matches. Garbage never selects an
/// address, and never turns the client into the proxy.
pub fn client_address(peer: IpAddr, forwarded_for: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let unknown = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    let peer = canonical(peer);
    let is_trusted = |a: &IpAddr| trusted.iter().any(|n| n.contains(a));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded_for else { return peer };
    for hop in header.rsplit(',') {
        let Some(addr) = parse_hop(hop).map(canonical) else { return unknown };
        if !is_trusted(&addr) {
            return addr;
        }
    }
    unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allow_lists_within_a_ceiling() {
        let list = |t: &str| AllowedCidrs::parse_list(t).unwrap();
        let office = list("203.0.113.0/24");
        assert!(list("203.0.113.7").is_within(&office));
        assert!(list("203.0.113.0/25, 203.0.113.128/25").is_within(&office));
        assert!(!list("203.0.113.0/23").is_within(&office), "wider network");
        assert!(!list("203.0.113.7, 198.51.100.1").is_within(&office), "one address outside");
        assert!(!list("").is_within(&office), "any address is wider than an office");
        assert!(list("").is_within(&list("")));
        assert!(office.is_within(&list("")));
    }

    #[test]
    fn cidrs_parse_and_match() {
        let list = AllowedCidrs::parse_list("203.0.113.7/24, 2001:db8::/32 198.51.100.9").unwrap();
        assert_eq!(list.to_storage(), "198.51.100.9/32 203.0.113.0/24 2001:db8::/32");
        assert!(list.permits(ip("203.0.113.200")));
        assert!(list.permits(ip("::ffff:203.0.113.1")));
        assert!(list.permits(ip("2001:db8:1::5")));
        assert!(!list.permits(ip("198.51.100.10")));
        assert!(AllowedCidrs::default().permits(ip("1.2.3.4")), "empty allows all");
        assert!(AllowedCidrs::parse_list("10.0.0.0/33").is_err());
        assert!(AllowedCidrs::parse_list("example.com").is_err());
        let many: Vec<String> = (0..33).map(|i| format!("10.0.{i}.0/24")).collect();
        assert_eq!(AllowedCidrs::parse_list(&many.join(",")), Err(CidrError::TooMany));
    }

    #[test]
    fn forwarded_for_is_honoured_only_from_trusted_peers() {
        let trusted = vec![parse_cidr("127.0.0.1").unwrap(), parse_cidr("10.0.0.0/8").unwrap()];
        let xff = Some("203.0.113.7, 10.1.1.1");
        assert_eq!(client_address(ip("192.0.2.1"), xff, &trusted), ip("192.0.2.1"), "untrusted peer: header ignored");
        assert_eq!(client_address(ip("127.0.0.1"), xff, &trusted), ip("203.0.113.7"));
        assert_eq!(
            client_address(ip("127.0.0.1"), Some("1.1.1.1, 203.0.113.7"), &trusted),
            ip("203.0.113.7"),
            "the spoofable left part is ignored"
        );
        let unknown = ip("0.0.0.0");
        assert_eq!(client_address(ip("127.0.0.1"), Some("10.2.2.2"), &trusted), unknown, "only proxies: unknown");
        assert_eq!(client_address(ip("127.0.0.1"), Some("203.0.113.7, garbage, 10.1.1.1"), &trusted), unknown);
        assert_eq!(client_address(ip("127.0.0.1"), Some("203.0.113.7:5123"), &trusted), ip("203.0.113.7"));
        assert_eq!(client_address(ip("127.0.0.1"), Some("[2001:db8::1]:443"), &trusted), ip("2001:db8::1"));
        assert_eq!(client_address(ip("127.0.0.1"), Some("[2001:db8::2]"), &trusted), ip("2001:db8::2"));
        assert_eq!(client_address(ip("127.0.0.1"), None, &trusted), ip("127.0.0.1"));
        assert_eq!(client_address(ip("127.0.0.1"), xff, &[]), ip("127.0.0.1"), "no trusted proxies configured");
    }
}
