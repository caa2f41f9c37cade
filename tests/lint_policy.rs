//! The lint policy lives in one place: the root `Cargo.toml` denies `unwrap_used`,
//! `indexing_slicing` and `undocumented_unsafe_blocks` for the whole workspace, every member
//! inherits it (`[lints] workspace = true`), `clippy.toml` exempts unit tests, and no library
//! source repeats or overrides those lints (clippy cannot tell an `allow` that hides a panic in
//! library code from a legitimate one, so this test refuses them all). Reads files only; the lints
//! themselves are clippy's job.
#![allow(clippy::unwrap_used, clippy::indexing_slicing)] // test crate: see [workspace.lints]

use std::fs;
use std::path::{Path, PathBuf};

const POLICY: [&str; 3] = [
    "unwrap_used",
    "indexing_slicing",
    "undocumented_unsafe_blocks",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn read_toml(path: &Path) -> toml::Table {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn members(manifest: &toml::Table) -> Vec<String> {
    manifest["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_owned())
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn workspace_denies_the_policy_lints_and_every_member_inherits_them() {
    let root = root();
    let manifest = read_toml(&root.join("Cargo.toml"));
    let clippy = &manifest["workspace"]["lints"]["clippy"];
    for lint in POLICY {
        assert_eq!(
            clippy.get(lint).and_then(|v| v.as_str()),
            Some("deny"),
            "[workspace.lints.clippy] {lint}"
        );
    }
    for m in members(&manifest) {
        let member = read_toml(&root.join(&m).join("Cargo.toml"));
        let inherits = member
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(|w| w.as_bool());
        assert_eq!(
            inherits,
            Some(true),
            "{m}/Cargo.toml: [lints] workspace = true"
        );
    }
}

#[test]
fn clippy_toml_exempts_unit_tests() {
    let conf = read_toml(&root().join("clippy.toml"));
    for key in ["allow-unwrap-in-tests", "allow-indexing-slicing-in-tests"] {
        assert_eq!(
            conf.get(key).and_then(|v| v.as_bool()),
            Some(true),
            "clippy.toml {key}"
        );
    }
}

#[test]
fn library_sources_neither_repeat_nor_override_the_policy() {
    let root = root();
    let mut offenders = Vec::new();
    for m in members(&read_toml(&root.join("Cargo.toml"))) {
        let mut files = Vec::new();
        rust_files(&root.join(&m).join("src"), &mut files);
        for f in files {
            let text = fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                if POLICY
                    .iter()
                    .any(|l| line.contains(&format!("clippy::{l}")))
                {
                    offenders.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
                }
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "the policy lints are set in the root Cargo.toml only:\n{}",
        offenders.join("\n")
    );
}
