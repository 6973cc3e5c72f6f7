//! The `Retry-After` header (RFC 9110 §10.2.3): delta-seconds or an HTTP-date. Anything else is
//! ignored, never an error: a malformed header from the app must not cost a message.

use std::time::{Duration, SystemTime};

/// How long the app asked to wait, from a `Retry-After` value, as seen at `now`. A date in the
/// past is zero; an unparsable value is `None`.
pub fn parse(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        // Huge numbers saturate rather than fail: the caller caps the wait anyway.
        let secs = value.parse::<u64>().unwrap_or(u64::MAX);
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_dates_and_garbage() {
        let now = httpdate::parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        let secs = Duration::from_secs;
        assert_eq!(parse("120", now), Some(secs(120)));
        assert_eq!(parse(" 0 ", now), Some(secs(0)));
        assert_eq!(parse("99999999999999999999999", now), Some(secs(u64::MAX)));
        assert_eq!(parse("Sun, 06 Nov 1994 08:50:07 GMT", now), Some(secs(30)));
        // The obsolete forms HTTP-date allows.
        assert_eq!(parse("Sunday, 06-Nov-94 08:50:07 GMT", now), Some(secs(30)));
        assert_eq!(parse("Sun Nov  6 08:50:07 1994", now), Some(secs(30)));
        assert_eq!(
            parse("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(secs(0)),
            "past"
        );
        for bad in [
            "",
            "-5",
            "1.5",
            "soon",
            "5s",
            "Sun, 32 Nov 1994 08:49:37 GMT",
            "\u{00e9}",
        ] {
            assert_eq!(parse(bad, now), None, "{bad:?}");
        }
    }
}
