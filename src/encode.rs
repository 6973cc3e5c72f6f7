//! Percent-encoding of the few URL parts the sidecar builds itself (management API paths,
//! Kubernetes label selectors).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// Everything but RFC 3986's unreserved characters.
const RESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// `s` percent-encoded so that it is one path segment or query value whatever it holds.
pub(crate) fn path_segment(s: &str) -> String {
    utf8_percent_encode(s, RESERVED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unreserved_characters_stay() {
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(
            path_segment("orders.dead-letter_1~"),
            "orders.dead-letter_1~"
        );
        assert_eq!(path_segment("app=web,tier!=db"), "app%3Dweb%2Ctier%21%3Ddb");
        assert_eq!(path_segment("ü"), "%C3%BC");
    }
}
