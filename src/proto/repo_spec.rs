//! Parsing the repositories a user names: `owner/name`, an `http(s)://` (or `git://`) URL, or
//! an absolute local path, each optionally followed by `#branch`.
//!
//! Refused with a reason, and never echoed back when they may hold a secret:
//! - ssh repositories (`ssh://...`, scp-like `git@host:path`): this build fetches over https
//!   only (a private repository is reached with the node's `--github-token`);
//! - credentials in a URL (`https://user:pass@host/...`, `https://token@host/...`): they would
//!   be stored in the job for every peer to see; the node's token is used instead.

use super::jobs::RepoSpec;

/// What kind of repository a spec names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    /// `owner/name` on GitHub.
    GitHub,
    /// A URL (`https`, `http` or `git`; never with credentials).
    Url,
    /// An absolute path on the node (only where its operator allows it).
    LocalPath,
}

/// What a repository given with ssh gets.
pub const SSH_UNSUPPORTED: &str =
    "ssh repositories are not supported; use an https:// URL (a private repository is fetched with the node's --github-token)";
/// What a repository URL with credentials in it gets.
pub const CREDENTIALS_IN_URL: &str =
    "a repository URL must not contain credentials (user:password@ or token@); configure a token on the node instead (--github-token)";

/// Parse `source[#branch]`, refusing anything malformed with a reason.
pub fn parse_repo(text: &str) -> Result<RepoSpec, String> {
    let text = text.trim();
    // Before anything that quotes the text: it may hold a credential.
    refuse_unsupported(text)?;
    let (source, branch) = match text.rsplit_once('#') {
        Some((source, branch)) => (source, Some(branch)),
        None => (text, None),
    };
    if let Some(branch) = branch {
        validate_branch(branch)?;
    }
    repo_kind(source)?;
    Ok(RepoSpec {
        source: source.to_string(),
        branch: branch.map(str::to_string),
    })
}

/// Classify a repository source, or say why it is malformed.
pub fn repo_kind(source: &str) -> Result<RepoKind, String> {
    let bad = |why: &str| {
        Err(format!(
            "malformed repository {source:?}: {why} (use owner/name, an https:// URL, or an absolute path, optionally with #branch)"
        ))
    };
    refuse_unsupported(source)?;
    if source.is_empty() || source.len() > 256 {
        return bad("empty or too long");
    }
    if source.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return bad("contains spaces or control characters");
    }
    if source.starts_with('/') {
        return if source.split('/').any(|part| part == "..") {
            bad("`..` is not allowed in a path")
        } else {
            Ok(RepoKind::LocalPath)
        };
    }
    for scheme in ["https://", "http://", "git://"] {
        if let Some(rest) = source.strip_prefix(scheme) {
            let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
            let host = authority.rsplit('@').next().unwrap_or("");
            return if host.is_empty() || path.is_empty() {
                bad("the URL needs a host and a path")
            } else {
                Ok(RepoKind::Url)
            };
        }
    }
    if source.contains(':') {
        return bad("unknown URL form");
    }
    let mut parts = source.split('/');
    let (owner, name) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let owner_ok = !owner.is_empty()
        && owner.len() <= 39
        && owner.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    let name_ok = !name.is_empty()
        && name.len() <= 100
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if parts.next().is_none() && owner_ok && name_ok {
        Ok(RepoKind::GitHub)
    } else {
        bad("not owner/name")
    }
}

/// Refuse ssh repositories and URLs with credentials, without quoting `text`.
fn refuse_unsupported(text: &str) -> Result<(), String> {
    let lower = text.to_ascii_lowercase();
    if let Some((scheme, rest)) = lower.split_once("://") {
        if scheme.split('+').any(|part| part == "ssh") {
            return Err(SSH_UNSUPPORTED.into());
        }
        let authority = rest.split('/').next().unwrap_or("");
        if authority.contains('@') {
            return Err(CREDENTIALS_IN_URL.into());
        }
        return Ok(());
    }
    // scp-like `user@host:path`, which git fetches over ssh.
    if let Some((user_host, _)) = text.split_once(':') {
        if user_host.contains('@') && !user_host.contains('/') {
            return Err(SSH_UNSUPPORTED.into());
        }
    }
    Ok(())
}

/// A branch name git would accept, conservatively.
fn validate_branch(branch: &str) -> Result<(), String> {
    let ok = !branch.is_empty()
        && branch.len() <= 200
        && !branch.starts_with(['-', '/', '.'])
        && !branch.ends_with(['/', '.'])
        && !branch.contains("..")
        && !branch.contains("//")
        && !branch.ends_with(".lock")
        && branch
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid branch name {branch:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_the_documented_forms() {
        let cases = [
            ("openai/codex", RepoKind::GitHub),
            ("my-org/my.repo_2", RepoKind::GitHub),
            ("https://github.com/o/r.git", RepoKind::Url),
            ("http://127.0.0.1:8080/r.git", RepoKind::Url),
            ("git://127.0.0.1:9418/r.git", RepoKind::Url),
            ("/srv/git/repo", RepoKind::LocalPath),
        ];
        for (text, kind) in cases {
            assert_eq!(repo_kind(text), Ok(kind), "{text}");
        }
        let spec = parse_repo("openai/codex#feature/x").unwrap();
        assert_eq!(spec.source, "openai/codex");
        assert_eq!(spec.branch.as_deref(), Some("feature/x"));
    }

    #[test]
    fn refuses_malformed_specs_with_a_reason() {
        for text in [
            "",
            "codex",
            "a/b/c",
            "a b/c",
            "/srv/../etc",
            "https://",
            "ftp://x/y",
            "o/r#",
            "o/r#..",
            "o/r#-x",
            "x:y",
        ] {
            let err = parse_repo(text).expect_err(text);
            assert!(
                err.contains("malformed") || err.contains("branch"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn refuses_ssh_repositories() {
        for text in [
            "ssh://git@host/o/r.git",
            "ssh://host/o/r.git",
            "git+ssh://host/o/r.git",
            "SSH://host/o/r.git#main",
            "git@github.com:o/r.git",
            "git@github.com:o/r.git#main",
        ] {
            assert_eq!(parse_repo(text), Err(SSH_UNSUPPORTED.to_string()), "{text}");
            assert_eq!(
                repo_kind(text.split('#').next().unwrap_or(text)),
                Err(SSH_UNSUPPORTED.to_string()),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_credentials_in_urls_without_echoing_them() {
        for text in [
            "https://user:s3cret@github.com/o/r.git",
            "https://s3cret@github.com/o/r.git",
            "http://user:s3cret@127.0.0.1:8080/r.git#main",
            "HTTPS://user:s3cret@github.com/o/r.git",
            "https://user:s3cret#x@github.com/o/r.git",
            "https://user:s3cret@github.com/o/r .git",
        ] {
            let err = parse_repo(text).expect_err(text);
            assert_eq!(err, CREDENTIALS_IN_URL, "{text}");
            assert!(!err.contains("s3cret"), "{text}: {err}");
        }
        // An `@` in the path is no credential.
        assert_eq!(repo_kind("https://host/o/r@v1.git"), Ok(RepoKind::Url));
    }

    proptest! {
        #[test]
        fn never_panics(text in ".{0,300}") {
            let _ = parse_repo(&text);
        }
    }
}
