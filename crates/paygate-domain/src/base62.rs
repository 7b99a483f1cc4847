//! Fixed-width base62 (`0-9A-Za-z`): only characters a double-click selects and
//! secret scanners match; fixed width so that key text has a fixed layout.

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Characters needed for a `u128` (62^22 > 2^128).
pub const U128_WIDTH: usize = 22;
/// Characters needed for a `u32` (62^6 > 2^32).
pub const U32_WIDTH: usize = 6;

pub fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

fn digit(b: u8) -> Option<u128> {
    match b {
        b'0'..=b'9' => Some((b - b'0') as u128),
        b'A'..=b'Z' => Some((b - b'A') as u128 + 10),
        b'a'..=b'z' => Some((b - b'a') as u128 + 36),
        _ => None,
    }
}

/// Encodes `value` into exactly `width` characters, most significant first.
pub fn encode_fixed(value: u128, width: usize, out: &mut String) {
    let buf = encode_fixed_array(value);
    out.push_str(as_text(&buf[U128_WIDTH - width.min(U128_WIDTH)..]));
}

/// [`encode_fixed`] at the full width into a stack buffer (no allocation).
pub fn encode_fixed_array(mut value: u128) -> [u8; U128_WIDTH] {
    let mut buf = [b'0'; U128_WIDTH];
    for slot in buf.iter_mut().rev() {
        *slot = ALPHABET[(value % 62) as usize];
        value /= 62;
    }
    buf
}

/// Text of base62 digits (always ASCII).
pub fn as_text(digits: &[u8]) -> &str {
    std::str::from_utf8(digits).unwrap_or_default()
}

/// Decodes a fixed-width string; `None` if a character is outside the alphabet
/// or the value overflows `u128`.
pub fn decode(s: &str) -> Option<u128> {
    let mut value: u128 = 0;
    for &b in s.as_bytes() {
        value = value.checked_mul(62)?.checked_add(digit(b)?)?;
    }
    Some(value)
}

/// Encodes arbitrary bytes as a big number in exactly `width` characters.
/// Used for secrets: 32 random bytes always fit in 43 characters.
pub fn encode_bytes_fixed(bytes: &[u8], width: usize) -> String {
    // Schoolbook long division of a big-endian byte string by 62.
    let mut num: Vec<u8> = bytes.to_vec();
    let mut digits = Vec::with_capacity(width);
    for _ in 0..width {
        let mut rem: u32 = 0;
        for byte in num.iter_mut() {
            let acc = (rem << 8) | *byte as u32;
            *byte = (acc / 62) as u8;
            rem = acc % 62;
        }
        digits.push(ALPHABET[rem as usize]);
    }
    debug_assert!(num.iter().all(|b| *b == 0), "bytes do not fit in {width} characters");
    digits.reverse();
    String::from_utf8(digits).expect("base62 alphabet is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_u128_extremes() {
        for v in [0u128, 1, 61, 62, u64::MAX as u128, u128::MAX] {
            let mut s = String::new();
            encode_fixed(v, U128_WIDTH, &mut s);
            assert_eq!(s.len(), U128_WIDTH);
            assert_eq!(decode(&s), Some(v));
        }
    }

    #[test]
    fn rejects_foreign_characters_and_overflow() {
        assert_eq!(decode("abc-"), None);
        assert_eq!(decode("zzzzzzzzzzzzzzzzzzzzzzz"), None); // 23 chars overflow u128
    }

    #[test]
    fn bytes_encoding_is_fixed_width() {
        assert_eq!(encode_bytes_fixed(&[0u8; 32], 43), "0".repeat(43));
        assert_eq!(encode_bytes_fixed(&[0xff; 32], 43).len(), 43);
    }
}
