//! Just enough HTTP/1.1 for the harness's own requests: encoding a request
//! and finding where a response ends (Content-Length or chunked framing), for
//! the blocking seeding client here and the load sender of scenario 4.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, bail};

/// The bytes of one request. `Host` and, with a body, `Content-Type:
/// application/json` and `Content-Length` are added.
pub fn encode_request(
    method: &str,
    path: &str,
    host: SocketAddr,
    headers: &[(String, String)],
    body: Option<&str>,
) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    if let Some(body) = body {
        out.push_str("Content-Type: application/json\r\n");
        out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        out.push_str(body);
    } else {
        out.push_str("\r\n");
    }
    out.into_bytes()
}

/// A complete response at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Bytes of the buffer this response takes (head and body): the next one starts there.
    pub len: usize,
    /// Where the body starts and ends (for chunked framing: the encoded chunks).
    pub body: std::ops::Range<usize>,
    pub chunked: bool,
    /// The server will close the connection after it (`Connection: close`).
    pub close: bool,
}

impl Response {
    /// The body, de-chunked when needed.
    pub fn body_text(&self, buf: &[u8]) -> anyhow::Result<String> {
        let raw = &buf[self.body.clone()];
        let bytes = if self.chunked { dechunk(raw)? } else { raw.to_vec() };
        String::from_utf8(bytes).context("response body is not UTF-8")
    }
}

/// `Ok(None)` until `buf` holds a whole response; an error for what is not HTTP/1.1.
pub fn parse_response(buf: &[u8]) -> anyhow::Result<Option<Response>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4) else {
        if buf.len() > 64 * 1024 {
            bail!("response head longer than 64 KiB");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x status line: {status_line:?}");
    }
    let status: u16 = code.parse().with_context(|| format!("status line {status_line:?}"))?;
    let (mut length, mut chunked, mut close) = (None, false, version == "HTTP/1.0");
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else { bail!("header line without ':': {line:?}") };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().with_context(|| format!("Content-Length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().split(',').any(|t| t.trim() == "chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    let body_len = if chunked {
        match chunked_len(&buf[head_end..])? {
            Some(n) => n,
            None => return Ok(None),
        }
    } else if (100..200).contains(&status) || status == 204 || status == 304 {
        0
    } else {
        // Every answer the harness expects is framed; reading to EOF is not supported.
        length.context("response with neither Content-Length nor chunked framing")?
    };
    if buf.len() < head_end + body_len {
        return Ok(None);
    }
    Ok(Some(Response { status, len: head_end + body_len, body: head_end..head_end + body_len, chunked, close }))
}

/// Length of a complete chunked body (through the last chunk and trailers), or
/// `None` while incomplete.
fn chunked_len(buf: &[u8]) -> anyhow::Result<Option<usize>> {
    let mut at = 0;
    loop {
        let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
        let line = std::str::from_utf8(&buf[at..at + eol]).context("chunk size line")?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16)
            .with_context(|| format!("chunk size {line:?}"))?;
        at += eol + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(eol) = buf[at..].windows(2).position(|w| w == b"\r\n") else { return Ok(None) };
                at += eol + 2;
                if eol == 0 {
                    return Ok(Some(at));
                }
            }
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        at += size + 2;
    }
}

fn dechunk(mut raw: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = raw.windows(2).position(|w| w == b"\r\n").context("truncated chunk")?;
        let line = std::str::from_utf8(&raw[..eol])?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16)?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(raw.get(..size).context("truncated chunk")?);
        raw = raw.get(size + 2..).context("truncated chunk")?;
    }
}

/// One request on a fresh connection (blocking); the status and body. For
/// seeding, not for load.
pub fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.write_all(&encode_request(method, path, addr, headers, body))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(response) = parse_response(&buf)? {
            return Ok((response.status, response.body_text(&buf)?));
        }
        let n = stream.read(&mut chunk).with_context(|| format!("{method} {path}: reading the response"))?;
        if n == 0 {
            bail!("{method} {path}: connection closed before a whole response");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_requests_with_content_length() {
        let addr: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let headers = vec![("Authorization".to_owned(), "Bearer k".to_owned())];
        let bytes = encode_request("POST", "/v1/payments", addr, &headers, Some("{\"a\":1}"));
        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "POST /v1/payments HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAuthorization: Bearer k\r\n\
             Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
        let get = String::from_utf8(encode_request("GET", "/", addr, &[], None)).unwrap();
        assert_eq!(get, "GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n");
    }

    #[test]
    fn content_length_responses_and_pipelined_leftovers() {
        let one =
            "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"id\":\"x\"}\n";
        let buf = format!("{one}HTTP/1.1 200 OK\r\n");
        let r = parse_response(buf.as_bytes()).unwrap().unwrap();
        assert_eq!((r.status, r.len, r.close, r.chunked), (201, one.len(), false, false));
        assert_eq!(r.body_text(buf.as_bytes()).unwrap(), "{\"id\":\"x\"}\n");
        // Incomplete head, then incomplete body.
        assert_eq!(parse_response(&one.as_bytes()[..20]).unwrap(), None);
        assert_eq!(parse_response(&one.as_bytes()[..one.len() - 1]).unwrap(), None);
    }

    #[test]
    fn chunked_responses() {
        let text = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n4\r\nhell\r\n1;x=y\r\no\r\n0\r\n\r\n";
        let r = parse_response(text.as_bytes()).unwrap().unwrap();
        assert_eq!((r.status, r.len, r.chunked, r.close), (200, text.len(), true, true));
        assert_eq!(r.body_text(text.as_bytes()).unwrap(), "hello");
        assert_eq!(parse_response(&text.as_bytes()[..text.len() - 2]).unwrap(), None);
    }

    #[test]
    fn bodiless_and_broken_responses() {
        let r = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap().unwrap();
        assert_eq!((r.status, r.len), (204, 27));
        assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "unframed body");
        assert!(parse_response(b"HTTP/1.1 abc OK\r\ncontent-length: 0\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap().unwrap().close);
    }
}
