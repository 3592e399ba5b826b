//! Parsing the repositories a user names: `owner/name`, an `http(s)://` or `ssh://` URL,
//! `git@host:owner/name`, or an absolute local path, each optionally followed by `#branch`.

use super::jobs::RepoSpec;

/// What kind of repository a spec names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    /// `owner/name` on GitHub.
    GitHub,
    /// A URL (`http`, `https`, `ssh`, or scp-like `git@host:path`).
    Url,
    /// An absolute path on the node (only where its operator allows it).
    LocalPath,
}

/// Parse `source[#branch]`, refusing anything malformed with a reason.
pub fn parse_repo(text: &str) -> Result<RepoSpec, String> {
    let text = text.trim();
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
            "malformed repository {source:?}: {why} (use owner/name, an https:// or ssh:// URL, or an absolute path, optionally with #branch)"
        ))
    };
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
    for scheme in ["https://", "http://", "ssh://", "git://"] {
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
    if let Some((user_host, path)) = source.split_once(':') {
        if user_host.contains('@') && !path.is_empty() && !path.starts_with('/') {
            return Ok(RepoKind::Url);
        }
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
            ("ssh://git@host/o/r.git", RepoKind::Url),
            ("git://127.0.0.1:9418/r.git", RepoKind::Url),
            ("git@github.com:o/r.git", RepoKind::Url),
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

    proptest! {
        #[test]
        fn never_panics(text in ".{0,300}") {
            let _ = parse_repo(&text);
        }
    }
}
