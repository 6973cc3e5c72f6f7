//! Parsing one key's text. Each parser returns the problem in words; the caller names the key.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use hyper::Uri;
use lapin::uri::AMQPUri;

use super::AmqpNode;

pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write it like 250ms, 30s or 5m"))
}

pub(crate) fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than zero".into());
    }
    Ok(d)
}

pub(crate) fn parse_int(s: &str, min: u64, max: u64) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a whole number from {min} to {max}")),
    }
}

/// A share in `(0, 1]`, such as `0.5`.
pub(crate) fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r <= 1.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a ratio: expected a number above 0 and at most 1, such as 0.5"
        )),
    }
}

pub(crate) fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" | "" => Ok(false),
        _ => Err(format!("{s:?} is not a boolean: expected true or false")),
    }
}

pub(crate) fn parse_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    Ok(PathBuf::from(s))
}

/// Queue names are AMQP short strings: at most 255 bytes.
pub(crate) fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > 255 {
        return Err(format!(
            "is {} bytes long; AMQP names are at most 255 bytes",
            s.len()
        ));
    }
    Ok(s.to_string())
}

pub(crate) fn parse_http_url(s: &str) -> Result<Uri, String> {
    let uri: Uri = s
        .parse()
        .map_err(|_| "is not a valid URL: expected http://host:port/path".to_string())?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(uri),
        Some("https") => Err("https is not supported for the local app: use http://".into()),
        _ => Err("is not an http:// URL with a host".into()),
    }
}

/// Parses the node list. Errors name the node by position and never echo the URI (passwords).
pub(crate) fn parse_nodes(s: &str) -> Result<Vec<AmqpNode>, String> {
    let mut nodes = Vec::new();
    for (i, part) in s.split(',').map(str::trim).enumerate() {
        if part.is_empty() {
            continue;
        }
        nodes.push(parse_node(part).map_err(|e| format!("node {}: {e}", i + 1))?);
    }
    if nodes.is_empty() {
        return Err("names no broker node".into());
    }
    Ok(nodes)
}

pub(crate) fn parse_node(s: &str) -> Result<AmqpNode, String> {
    let tls = if s.starts_with("amqps://") {
        true
    } else if s.starts_with("amqp://") {
        false
    } else {
        return Err("is not an amqp:// or amqps:// URI".into());
    };
    let mut uri = AMQPUri::from_str(s).map_err(|_| "is not a valid AMQP URI".to_string())?;
    // amq-protocol-uri keeps only DNS names as the host and turns IP literals into "localhost";
    // keep what the user wrote so 127.0.0.2 and ::1 mean what they say.
    if let Some(host) = literal_host(s) {
        uri.authority.host = host;
    }
    Ok(AmqpNode { uri, tls })
}

/// The host part of `scheme://[userinfo@]host[:port][/...]`, IPv6 brackets removed.
fn literal_host(s: &str) -> Option<String> {
    let rest = s.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(inner) = hostport.strip_prefix('[') {
        inner.split(']').next()?
    } else {
        hostport.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_hosts_survive_parsing() {
        assert_eq!(
            literal_host("amqp://u:p@127.0.0.2:5672/%2f").unwrap(),
            "127.0.0.2"
        );
        assert_eq!(literal_host("amqp://[::1]:5672").unwrap(), "::1");
        assert_eq!(
            literal_host("amqps://rabbit.local").unwrap(),
            "rabbit.local"
        );
        assert_eq!(literal_host("amqp://a@b@c:1/").unwrap(), "c");
    }
}
