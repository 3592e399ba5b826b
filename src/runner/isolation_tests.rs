//! Unit tests of the agent isolation mechanics (those that change owners run only as root).

use super::*;

fn is_root() -> bool {
    euid() == 0
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

#[test]
fn users_are_looked_up_in_the_user_database() {
    let root = lookup_user("root").expect("root exists");
    assert_eq!((root.uid, root.gid), (0, 0));
    assert!(root.home.is_absolute(), "{:?}", root.home);
    let err = lookup_user("no-such-user-codex-mesh").unwrap_err();
    assert!(err.to_string().contains("no such user"), "{err}");
    assert!(lookup_user("bad\0name").is_err());
}

#[test]
fn masked_commands_run_in_bubblewrap_with_the_data_dir_hidden() {
    let mut bwrap = Bwrap {
        program: "/usr/bin/bwrap".into(),
        hidden: "/data".into(),
        rebind: None,
        keep_caps: false,
    };
    let masked = Isolation {
        mode: Mode::Masked(bwrap.clone()),
    };
    let argv = masked.wrap(&["sh".to_string(), "-c".to_string(), "x".to_string()]);
    assert_eq!(argv[0], "/usr/bin/bwrap");
    assert!(argv.windows(2).any(|w| w == ["--tmpfs", "/data"]));
    assert!(argv.windows(2).any(|w| w == ["--proc", "/proc"]));
    assert!(argv.windows(2).any(|w| w == ["--dev", "/dev"]));
    assert!(argv.windows(2).any(|w| w == ["--cap-drop", "ALL"]));
    assert!(argv.contains(&"--unshare-pid".to_string()));
    assert!(argv.contains(&"--die-with-parent".to_string()));
    assert_eq!(argv[argv.len() - 4..], ["--", "sh", "-c", "x"]);
    bwrap.keep_caps = true;
    bwrap.rebind = Some("/data/jobs".into());
    let args = bwrap.args();
    assert!(!args.contains(&"--cap-drop".to_string()), "{args:?}");
    let tmpfs = args.iter().position(|a| a == "--tmpfs").expect("tmpfs");
    let rebind = args
        .windows(3)
        .position(|w| w == ["--bind", "/data/jobs", "/data/jobs"]);
    assert!(
        rebind.is_some_and(|at| at > tmpfs),
        "bound back after the mask: {args:?}"
    );
    let unprotected = Isolation {
        mode: Mode::Unprotected,
    };
    assert_eq!(unprotected.wrap(&["a".to_string()]), ["a"]);
    let refused = Isolation {
        mode: Mode::Refused(ROOT_REFUSAL.into()),
    };
    assert!(refused.check().unwrap_err().contains("--allow-root-agents"));
}

#[test]
fn the_workdir_root_is_made_private_and_a_loose_one_tightened() {
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("jobs");
    prepare_root(&root, None).expect("prepare");
    assert_eq!(mode_of(&root), 0o700);
    assert!(!root.join(SPARES_DIR).exists(), "made with the first spare");
    std::fs::create_dir(root.join(SPARES_DIR)).expect("mkdir");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    prepare_root(&root, None).expect("prepare again");
    assert_eq!(mode_of(&root), 0o700);
    assert_eq!(mode_of(&root.join(SPARES_DIR)), 0o700);
}

#[test]
fn a_workdir_root_of_another_user_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root to give a directory to another user");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("jobs");
    std::fs::create_dir(&root).expect("mkdir");
    std::os::unix::fs::chown(&root, Some(65534), Some(65534)).expect("chown");
    let err = prepare_root(&root, None).unwrap_err();
    assert!(err.to_string().contains("belongs to another user"), "{err}");
    // A link planted in place of the root is refused too, whoever owns its target.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path(), &link).expect("symlink");
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).expect("lchown");
    assert!(prepare_root(&link, None).is_err());
}

#[test]
fn handing_over_never_follows_symbolic_links() {
    if !is_root() {
        eprintln!("skipped: needs root to change owners");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("secret"), "s").expect("write");
    let job = dir.path().join("job");
    std::fs::create_dir_all(job.join("repo/src")).expect("mkdir");
    std::fs::write(job.join("repo/src/main.rs"), "fn main() {}").expect("write");
    std::os::unix::fs::symlink(outside.join("secret"), job.join("repo/shadow")).expect("link");
    std::os::unix::fs::symlink(&outside, job.join("repo/linked-dir")).expect("link");
    chown_tree(&job, 65534, 65534).expect("chown tree");
    for path in ["", "repo", "repo/src", "repo/src/main.rs", "repo/shadow"] {
        let meta = std::fs::symlink_metadata(job.join(path)).expect("lstat");
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{path}");
    }
    for path in [outside.clone(), outside.join("secret")] {
        assert_eq!(std::fs::metadata(&path).expect("stat").uid(), 0, "{path:?}");
    }
}

#[tokio::test]
async fn files_left_by_the_agent_are_read_and_replaced_without_following_links() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "top secret").expect("write");
    let last = dir.path().join("last");
    std::fs::write(&last, "the answer").expect("write");
    assert_eq!(read_agent_file(&last).await.as_deref(), Some("the answer"));
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&secret, &link).expect("symlink");
    assert_eq!(read_agent_file(&link).await, None, "a link is not followed");
    let hard = dir.path().join("hard");
    std::fs::hard_link(&secret, &hard).expect("hard link");
    assert_eq!(
        read_agent_file(&hard).await,
        None,
        "a second name is refused"
    );
    let fifo = CString::new(dir.path().join("fifo").as_os_str().as_bytes()).expect("path");
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    assert_eq!(read_agent_file(&dir.path().join("fifo")).await, None);

    write_marker(&link).await.expect("marker");
    assert_eq!(
        std::fs::read_to_string(&secret).expect("read"),
        "top secret"
    );
    assert!(std::fs::symlink_metadata(&link).expect("lstat").is_file());
}

#[test]
fn a_checkout_shares_no_object_file_with_the_mirror() {
    use crate::runner::testing::git;
    let dir = tempfile::tempdir().expect("temp dir");
    let work = dir.path().join("work");
    std::fs::create_dir(&work).expect("mkdir");
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("a.txt"), "a").expect("write");
    git(&work, &["add", "."]);
    git(&work, &["commit", "-q", "-m", "one"]);
    let mirror = dir.path().join("mirror.git");
    git(dir.path(), &["clone", "-q", "--bare", "work", "mirror.git"]);
    git(&mirror, &["repack", "-q", "-a", "-d"]);
    let checkout = dir.path().join("checkout");
    crate::runner::repos::clone_from_mirror(&mirror, None, &checkout).expect("clone");
    let packs = |repo: &Path| -> Vec<(String, u64)> {
        let mut packs: Vec<(String, u64)> = std::fs::read_dir(repo.join("objects/pack"))
            .expect("pack dir")
            .flatten()
            .map(|e| {
                let meta = e.metadata().expect("metadata");
                (e.file_name().to_string_lossy().into_owned(), meta.ino())
            })
            .collect();
        packs.sort();
        packs
    };
    let (theirs, ours) = (packs(&mirror), packs(&checkout.join(".git")));
    assert!(
        !theirs.is_empty() && !ours.is_empty(),
        "{theirs:?} {ours:?}"
    );
    for (name, ino) in &ours {
        assert!(
            theirs.iter().all(|(_, mirror_ino)| mirror_ino != ino),
            "{name} is the mirror's inode {ino}"
        );
    }
}

#[test]
fn an_agent_user_must_be_able_to_reach_the_workdir_root() {
    let dir = tempfile::tempdir().expect("temp dir");
    let nobody = AgentUser {
        name: "nobody".into(),
        uid: 65534,
        gid: 65534,
        home: "/nonexistent".into(),
    };
    let closed = dir.path().join("closed");
    std::fs::create_dir(&closed).expect("mkdir");
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let err = reachable_by(&closed.join("jobs/deeper"), &nobody).unwrap_err();
    assert!(err.to_string().contains("cannot enter"), "{err}");
    assert!(
        !closed.join("jobs").exists(),
        "nothing made before the check"
    );
    let open = dir.path().join("open").join("jobs");
    reachable_by(&open, &nobody).expect("a searchable path");
    prepare_root(&open, None).expect("prepare");
    assert_eq!(mode_of(&open), 0o700, "only the root itself is private");
}
