//! Which servers may receive the node's git token. A repository URL comes from whoever
//! submitted the job, so the token goes only to the host of `--github-url` and the hosts the
//! operator lists with `--credential-hosts`, and only over https unless the operator allows
//! plain http for them (`--allow-http-credentials`, for servers on a trusted network).

use std::collections::BTreeSet;

/// The hosts that may receive the token, and over which schemes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialPolicy {
    /// `host` (any port) or `host:port` entries, lower case.
    hosts: BTreeSet<String>,
    /// Whether plain `http://` counts as well as `https://`.
    allow_http: bool,
}

/// Why a host list entry is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid credential host {0:?}: give a host name or address, optionally with :port")]
pub struct BadHost(pub String);

impl CredentialPolicy {
    /// The policy for the `github_url` host plus `extra` hosts.
    pub fn new(github_url: &str, extra: &[String], allow_http: bool) -> Result<Self, BadHost> {
        let mut hosts = BTreeSet::new();
        if let Some(authority) = url_authority(github_url) {
            hosts.insert(authority);
        }
        for entry in extra.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let host = entry.to_ascii_lowercase();
            let valid = host.len() <= 255
                && !host.contains(['/', '@', ' '])
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.:[]_".contains(c));
            if !valid {
                return Err(BadHost(entry.to_string()));
            }
            hosts.insert(host);
        }
        Ok(Self { hosts, allow_http })
    }

    /// Whether the token may be sent to the server of `url`.
    pub fn allows(&self, url: &str) -> bool {
        let Some((scheme, _)) = url.split_once("://") else {
            return false;
        };
        let scheme_ok = match scheme.to_ascii_lowercase().as_str() {
            "https" => true,
            "http" => self.allow_http,
            _ => false,
        };
        let Some(authority) = url_authority(url) else {
            return false;
        };
        let host = host_part(&authority);
        scheme_ok && (self.hosts.contains(&authority) || self.hosts.contains(host))
    }
}

/// `host[:port]` of an `scheme://[user@]host[:port]/...` URL, lower case.
fn url_authority(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    (!authority.is_empty()).then(|| authority.to_ascii_lowercase())
}

/// The host of `host[:port]` (IPv6 addresses in brackets keep their brackets).
fn host_part(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .find(']')
            .map_or(authority, |end| &authority[..=end]);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_github_host_and_listed_hosts_over_https() {
        let policy = CredentialPolicy::new(
            "https://github.com",
            &["git.example.org".into(), "10.0.0.5:8443".into()],
            false,
        )
        .unwrap();
        for url in [
            "https://github.com/o/r.git",
            "https://GitHub.com:443/o/r.git",
            "https://git.example.org/x.git",
            "https://git.example.org:8080/x.git",
            "https://10.0.0.5:8443/x.git",
        ] {
            assert!(policy.allows(url), "{url}");
        }
        for url in [
            "http://github.com/o/r.git",
            "https://github.com.evil.test/o/r.git",
            "https://evil.test/github.com/o/r.git",
            "https://github.com@evil.test/o/r.git",
            "https://10.0.0.5/x.git",
            "git://github.com/o/r.git",
            "ssh://github.com/o/r.git",
            "/srv/github.com/r",
            "",
        ] {
            assert!(!policy.allows(url), "{url}");
        }
    }

    #[test]
    fn plain_http_only_when_allowed_and_ports_must_match() {
        let strict = CredentialPolicy::new("http://127.0.0.1:9000", &[], false).unwrap();
        assert!(!strict.allows("http://127.0.0.1:9000/o/r.git"));
        let loose = CredentialPolicy::new("http://127.0.0.1:9000", &[], true).unwrap();
        assert!(loose.allows("http://127.0.0.1:9000/o/r.git"));
        assert!(!loose.allows("http://127.0.0.1:9001/o/r.git"));
        let v6 = CredentialPolicy::new("https://[::1]:9000", &["[::2]".into()], false).unwrap();
        assert!(v6.allows("https://[::1]:9000/r.git"));
        assert!(v6.allows("https://[::2]:1/r.git"));
        assert!(!v6.allows("https://[::1]:9001/r.git"));
    }

    #[test]
    fn malformed_host_entries_are_refused() {
        for bad in ["https://x", "a b", "user@host", "x/y"] {
            assert!(
                CredentialPolicy::new("https://github.com", &[bad.into()], false).is_err(),
                "{bad}"
            );
        }
    }
}
