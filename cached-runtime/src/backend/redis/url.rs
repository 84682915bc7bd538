//! What a Redis URL says, and the clients made from one: whether it asks
//! for TLS (by its parsed scheme, so that `valkeys://` and `REDISS://` are
//! TLS as `rediss://` is), a client trusting a private CA, and what is
//! wrong with a URL redis-rs refuses (never repeating the URL, which may
//! hold a password).

use redis::{ConnectionInfo, IntoConnectionInfo};

use crate::error::{Error, Result};

/// Whether `url`'s scheme asks for TLS: `rediss` or `valkeys`, in any case
/// (URL schemes are case-insensitive; redis-rs reads them lower-cased).
/// Without the `tls` feature, such a URL is refused with this crate's own
/// message (redis-rs cannot parse it); with it, the parsed URL decides.
#[cfg(any(test, not(feature = "tls")))]
pub(crate) fn wants_tls(url: &str) -> bool {
    url.split_once("://").is_some_and(|(scheme, _)| {
        scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
    })
}

/// Whether `info` connects with TLS.
pub(crate) fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
}

/// A client for `url`; `tls_root` (PEM) replaces the system's trusted
/// roots for a TLS URL.
pub(crate) fn open_client(url: &str, tls_root: Option<&[u8]>) -> Result<redis::Client> {
    #[cfg(not(feature = "tls"))]
    if tls_root.is_some() || wants_tls(url) {
        return Err(no_tls());
    }
    let info = url
        .into_connection_info()
        .map_err(|e| invalid_url_in(&[url], &e))?;
    open_client_with(info, tls_root).map_err(|e| invalid_url_in(&[url], &e))
}

/// A client for the server `client` connects to, speaking RESP3 (for
/// push messages), with the same credentials and TLS settings.
pub(crate) fn resp3(client: &redis::Client) -> redis::RedisResult<redis::Client> {
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings))
}

/// A client for `info`, trusting `tls_root` (PEM) rather than the
/// system's roots if given.
#[cfg(feature = "tls")]
pub(crate) fn open_client_with(
    info: ConnectionInfo,
    tls_root: Option<&[u8]>,
) -> redis::RedisResult<redis::Client> {
    install_crypto_provider();
    match tls_root {
        Some(pem) => redis::Client::build_with_tls(
            info,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
        None => redis::Client::open(info),
    }
}

/// Without the `tls` feature, callers refuse a root certificate first.
#[cfg(not(feature = "tls"))]
pub(crate) fn open_client_with(
    info: ConnectionInfo,
    _tls_root: Option<&[u8]>,
) -> redis::RedisResult<redis::Client> {
    redis::Client::open(info)
}

/// Installs rustls's crypto provider for the process, once.
#[cfg(feature = "tls")]
pub(crate) fn install_crypto_provider() {
    // One process-wide provider; if the application installed its own, keep it.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The error for a TLS URL or a CA without the `tls` feature.
#[cfg(not(feature = "tls"))]
pub(crate) fn no_tls() -> Error {
    Error::Config("rediss:// (or valkeys://) needs the `tls` feature of redis-cached".into())
}

pub(crate) fn invalid_url(err: &redis::RedisError) -> Error {
    // redis-rs describes a URL problem in fixed words ("Invalid database
    // number", "Missing hostname"), kept; its detail, which may quote the
    // URL (and a password), is not.
    let text = err.to_string();
    let described = text
        .split(" - ")
        .next()
        .filter(|desc| !desc.is_empty() && desc.len() < text.len())
        .filter(|desc| !desc.contains("://") && !desc.contains('@') && !desc.contains(':'));
    match described {
        Some(desc) => Error::InvalidUrl(format!("{desc} ({:?})", err.kind())),
        None => Error::InvalidUrl(format!("{:?}", err.kind())),
    }
}

/// What is wrong with `urls`, when redis-rs refuses one: a scheme it does
/// not know, named (never the rest of a URL, which may hold a password), a
/// URL with no scheme, or else redis-rs's kind of error.
pub(crate) fn invalid_url_in<S: AsRef<str>>(urls: &[S], err: &redis::RedisError) -> Error {
    urls.iter()
        .find_map(|url| scheme_problem(url.as_ref()))
        .unwrap_or_else(|| invalid_url(err))
}

fn scheme_problem(url: &str) -> Option<Error> {
    const SCHEMES: &str = "redis:// (or valkey://), rediss:// (TLS), redis+unix:// or unix://";
    match url.split_once("://") {
        Some((scheme, _))
            if !scheme.is_empty()
                && scheme.len() <= 16
                && scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'+')
                && !matches!(
                    scheme,
                    "redis" | "rediss" | "valkey" | "valkeys" | "redis+unix" | "unix"
                ) =>
        {
            Some(Error::InvalidUrl(format!(
                "unknown scheme `{scheme}`: use {SCHEMES}"
            )))
        }
        None => Some(Error::InvalidUrl(format!(
            "not a Redis URL (no `scheme://`): write e.g. redis://[user:password@]host[:port][/db]; schemes are {SCHEMES}"
        ))),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_is_read_from_the_scheme_in_any_case() {
        for url in [
            "rediss://h:6380/",
            "valkeys://h:6380/",
            "REDISS://h:6380/",
            "Valkeys://:pw@h/",
        ] {
            assert!(wants_tls(url), "{url}");
        }
        for url in [
            "redis://h/",
            "valkey://h/",
            "unix:///tmp/s",
            "h:6379",
            "redis://rediss/",
        ] {
            assert!(!wants_tls(url), "{url}");
        }
    }

    #[cfg(feature = "tls")]
    #[test]
    fn parsed_tls_urls_connect_with_tls() {
        for url in ["rediss://h:6380/", "valkeys://h:6380/", "REDISS://h:6380/"] {
            let info = url.into_connection_info().expect("a valid URL");
            assert!(is_tls(&info), "{url}");
        }
        let info = "valkey://h/".into_connection_info().expect("a valid URL");
        assert!(!is_tls(&info));
    }
}
