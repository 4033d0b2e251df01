//! DNS rebinding protection for the MCP HTTP gateway, as the MCP transport spec asks of
//! every Streamable HTTP server ("servers MUST validate the Origin header").
//!
//! A web page whose DNS name its owner re-points at this node's address reaches the
//! node as a same-origin request to *its* name: the browser sends that name as `Host`
//! and the page's origin as `Origin`. Every gateway request also needs the agent's
//! bearer token, which such a page does not have, but the check costs nothing and is
//! what clients and conformance suites expect. So before anything else (even
//! authentication) a request is refused with 403 if
//! - its `Host` is not one of `[server] allowed_hosts` (by default, on a node that
//!   listens on a loopback address, the loopback names; elsewhere any host, since the
//!   node cannot know the names it is reached by), or
//! - it carries an `Origin` that is neither listed in `[server] allowed_origins` nor the
//!   node's own: a host that passes the `Host` check and, when any host may, the
//!   request's own `Host` (same origin). A request without `Origin` (not from a
//!   browser) is judged by its `Host` alone.

use std::net::{IpAddr, SocketAddr};

use axum::http::{header, HeaderMap};
use warden_core::config::{HostAllowList, Settings};

/// The loopback names a node listening on loopback answers by default.
const LOOPBACK: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

pub struct RebindingGuard {
    /// `None`: any host.
    hosts: Option<Vec<String>>,
    origins: Vec<String>,
}

impl RebindingGuard {
    pub fn new(settings: &Settings) -> Self {
        let hosts = match &settings.mcp_allowed_hosts {
            HostAllowList::Any => None,
            HostAllowList::Only(list) => Some(list.clone()),
            HostAllowList::Default => {
                listens_on_loopback(&settings.listen).then(|| LOOPBACK.map(String::from).to_vec())
            }
        };
        Self {
            hosts,
            origins: settings.mcp_allowed_origins.clone(),
        }
    }

    /// Why this request may not be answered, if it may not.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), String> {
        let host = single(headers, header::HOST)?.map(|h| h.to_ascii_lowercase());
        if let Some(allowed) = &self.hosts {
            let Some(h) = &host else {
                return Err("the request has no Host header".into());
            };
            if !host_allowed(allowed, h) {
                return Err(format!(
                    "Host `{}` is not one this gateway answers (`[server] allowed_hosts`)",
                    shown(h)
                ));
            }
        }
        let Some(origin) = single(headers, header::ORIGIN)? else {
            return Ok(());
        };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        if self.origins.contains(&origin) {
            return Ok(());
        }
        let authority = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        let own = match (authority, &self.hosts) {
            (Some(a), Some(allowed)) => host_allowed(allowed, a),
            (Some(a), None) => host.as_deref() == Some(a),
            (None, _) => false,
        };
        if own {
            Ok(())
        } else {
            Err(format!(
                "Origin `{}` may not use this gateway (`[server] allowed_origins`)",
                shown(&origin)
            ))
        }
    }
}

/// The header's one value; two of them (or one that is not text) is a refusal.
fn single(headers: &HeaderMap, name: header::HeaderName) -> Result<Option<&str>, String> {
    let mut values = headers.get_all(&name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(format!("the request has more than one {name} header"));
    }
    first
        .map(|v| {
            v.to_str()
                .map_err(|_| format!("the request's {name} header is not text"))
        })
        .transpose()
}

fn host_allowed(allowed: &[String], authority: &str) -> bool {
    let name = host_part(authority);
    allowed
        .iter()
        .any(|a| a == authority || (host_part(a) == a && a == name))
}

/// `authority` without its port: `[::1]:80` -> `[::1]`, `a.example:80` -> `a.example`.
fn host_part(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority.find(']').map_or(authority, |i| &authority[..=i]);
    }
    match authority.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn listens_on_loopback(listen: &str) -> bool {
    if let Ok(a) = listen.parse::<SocketAddr>() {
        return a.ip().is_loopback();
    }
    let host = host_part(listen);
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A header value as it may be shown in a message: printable ASCII, at most 100 chars.
fn shown(v: &str) -> String {
    v.chars()
        .take(100)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect()
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn guard(hosts: Option<&[&str]>, origins: &[&str]) -> RebindingGuard {
        RebindingGuard {
            hosts: hosts.map(|h| h.iter().map(|s| s.to_string()).collect()),
            origins: origins.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn headers(host: Option<&str>, origin: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = host {
            h.insert(header::HOST, HeaderValue::from_str(v).unwrap());
        }
        if let Some(v) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn loopback_hosts_pass_with_any_port_and_others_do_not() {
        let g = guard(Some(&LOOPBACK), &[]);
        for ok in [
            "localhost",
            "localhost:8480",
            "127.0.0.1:1",
            "[::1]:443",
            "LOCALHOST:9",
        ] {
            assert!(g.check(&headers(Some(ok), None)).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example.com",
            "evil.example.com:8480",
            "localhost.evil.example",
            "127.0.0.2",
            "[::2]:80",
        ] {
            let e = g.check(&headers(Some(bad), None)).unwrap_err();
            assert!(e.contains("allowed_hosts"), "{bad}: {e}");
        }
        assert!(g.check(&headers(None, None)).is_err(), "no Host");
    }

    #[test]
    fn an_entry_with_a_port_matches_that_port_only() {
        let g = guard(Some(&["mcp.example.com:8443", "10.0.0.5"]), &[]);
        assert!(g
            .check(&headers(Some("mcp.example.com:8443"), None))
            .is_ok());
        assert!(g.check(&headers(Some("mcp.example.com"), None)).is_err());
        assert!(g.check(&headers(Some("mcp.example.com:80"), None)).is_err());
        assert!(g.check(&headers(Some("10.0.0.5:8480"), None)).is_ok());
    }

    #[test]
    fn origins_must_be_the_nodes_own_or_listed() {
        let g = guard(Some(&LOOPBACK), &["https://console.example.com"]);
        let host = Some("127.0.0.1:8480");
        for ok in [
            "http://127.0.0.1:8480",
            "http://localhost:3000",
            "https://console.example.com",
            "https://Console.Example.com/",
        ] {
            assert!(g.check(&headers(host, Some(ok))).is_ok(), "{ok}");
        }
        for bad in [
            "http://evil.example.com",
            "null",
            "https://console.example.com.evil.example",
            "file://",
        ] {
            let e = g.check(&headers(host, Some(bad))).unwrap_err();
            assert!(e.contains("allowed_origins"), "{bad}: {e}");
        }
    }

    #[test]
    fn with_any_host_an_origin_must_match_the_requests_own_host() {
        let g = guard(None, &[]);
        assert!(g.check(&headers(Some("evil.example.com"), None)).is_ok());
        let same = headers(Some("mcp.example.com"), Some("https://mcp.example.com"));
        assert!(g.check(&same).is_ok());
        let cross = headers(Some("mcp.example.com"), Some("https://evil.example.com"));
        assert!(g.check(&cross).is_err());
    }

    #[test]
    fn two_host_or_origin_headers_are_refused() {
        let g = guard(None, &[]);
        let mut h = headers(Some("a.example"), None);
        h.append(header::HOST, HeaderValue::from_static("b.example"));
        assert!(g.check(&h).unwrap_err().contains("more than one"));
        let mut h = headers(Some("a.example"), Some("https://a.example"));
        h.append(
            header::ORIGIN,
            HeaderValue::from_static("https://a.example"),
        );
        assert!(g.check(&h).is_err());
    }

    #[test]
    fn the_default_follows_the_listen_address() {
        for l in [
            "127.0.0.1:8480",
            "[::1]:8480",
            "localhost:8480",
            "127.9.9.9:1",
        ] {
            assert!(listens_on_loopback(l), "{l}");
        }
        for l in [
            "0.0.0.0:8480",
            "[::]:8480",
            "10.0.0.5:8480",
            "mcp.example.com:8480",
        ] {
            assert!(!listens_on_loopback(l), "{l}");
        }
    }
}
