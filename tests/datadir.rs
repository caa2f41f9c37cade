//! The data directory against the real daemon: a damaged `SHARDS` file and a lost `server.key`
//! beside existing data make the daemon refuse to start with a message that says what to do,
//! instead of guessing (a shard count of 0, or a silently new server identity).
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

mod common;

use std::path::Path;

use common::*;

/// Starts a daemon on a fresh directory so that it writes `SHARDS`, `server.key` and one log
/// segment per shard, then stops it cleanly.
fn populate(data_dir: &Path, shards: usize) {
    let mut d = Daemon::start_in(data_dir, shards, &[]);
    assert!(d.terminate().success());
    for f in ["SHARDS", "server.key", "server.pub"] {
        assert!(data_dir.join(f).is_file(), "{f} was not written");
    }
}

/// A `SHARDS` file truncated to 0 bytes (what a crash right after a non-durable write leaves)
/// is refused with recovery advice naming the shard directories present, and never with the
/// advice to start with `--shards 0`.
#[test]
fn empty_shards_file_is_refused_with_recovery_advice() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    populate(&data, 2);
    std::fs::File::create(data.join("SHARDS")).unwrap();
    let (status, stderr) = run_expecting_exit(&data, 2, &[]);
    assert!(!status.success(), "started with an empty SHARDS file");
    assert!(stderr.contains("SHARDS is damaged"), "{stderr}");
    assert!(
        stderr.contains("must contain the number of shards"),
        "{stderr}"
    );
    assert!(stderr.contains("echo 2 >"), "{stderr}");
    assert!(!stderr.contains("--shards 0"), "{stderr}");
    // The file was left for the operator to repair, not rewritten behind their back.
    assert_eq!(std::fs::read(data.join("SHARDS")).unwrap(), b"");
    // Following the advice works.
    std::fs::write(data.join("SHARDS"), "2\n").unwrap();
    let mut d = Daemon::start_in(&data, 2, &[]);
    assert!(d.terminate().success());
}

/// A different shard count than the data was written with is still refused, naming the right one.
#[test]
fn shard_count_mismatch_names_the_count_to_use() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    populate(&data, 2);
    let (status, stderr) = run_expecting_exit(&data, 1, &[]);
    assert!(!status.success());
    assert!(stderr.contains("start with --shards 2"), "{stderr}");
}

/// Deleting `server.key` beside existing accounts and segments does not silently give the
/// server a new identity: the start is refused until `--new-server-key true` says it is meant,
/// and then the new key is written and published in `server.pub`.
#[test]
fn missing_server_key_beside_data_is_refused_unless_new_server_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    {
        let mut d = Daemon::start_in(&data, 2, &[]);
        let _alice = register_and_login(&d, 14155550100);
        assert!(d.terminate().success());
    }
    let old_pub = std::fs::read_to_string(data.join("server.pub")).unwrap();
    std::fs::remove_file(data.join("server.key")).unwrap();

    let (status, stderr) = run_expecting_exit(&data, 2, &[]);
    assert!(
        !status.success(),
        "started with a new identity over old data"
    );
    assert!(stderr.contains("server.key is missing"), "{stderr}");
    assert!(stderr.contains("--new-server-key true"), "{stderr}");
    assert!(
        !data.join("server.key").exists(),
        "a key was written anyway"
    );
    assert_eq!(
        std::fs::read_to_string(data.join("server.pub")).unwrap(),
        old_pub
    );

    let mut d = Daemon::start_in(&data, 2, &[("new-server-key", "true")]);
    assert!(d.terminate().success());
    assert!(data.join("server.key").is_file());
    assert_ne!(
        std::fs::read_to_string(data.join("server.pub")).unwrap(),
        old_pub
    );
}

/// A fresh data directory still gets a key without any flag.
#[test]
fn fresh_data_dir_gets_a_key_without_a_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    populate(&data, 1);
}
