//! Text encodings the sidecar needs for the few URLs and headers it builds itself (management API
//! paths, Kubernetes label selectors, basic auth, OTLP export headers). A leaf: small enough not
//! to pull in a crate.

/// Percent-encodes everything but RFC 3986 unreserved characters, so the result is one path
/// segment or query value whatever the input holds.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (as in `OTEL_EXPORTER_OTLP_HEADERS` values); `None` when a `%` is not
/// followed by two hex digits.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Standard base64 with padding (for `Authorization: Basic`).
pub fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes() {
        assert_eq!(base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b""), "");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
        assert_eq!(
            percent_encode("app=web,tier!=db"),
            "app%3Dweb%2Ctier%21%3Ddb"
        );
        assert_eq!(percent_decode("a%20b%2fc").unwrap(), b"a b/c");
        assert_eq!(
            percent_decode(&percent_encode("k=v, ü")).unwrap(),
            "k=v, ü".as_bytes()
        );
        assert!(percent_decode("50%").is_none());
        assert!(percent_decode("%zz").is_none());
        assert!(percent_decode("%+1").is_none());
    }
}
