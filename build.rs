//! Build script: the commit the binary is built from, for `pacsgate --version` (env PACSGATE_COMMIT).
//!
//! The commit comes from `git` when the source is a git checkout; a build from a tarball can set
//! PACSGATE_COMMIT itself (e.g. `PACSGATE_COMMIT=6e37160abcd1 cargo build --release`). A checkout whose
//! sources (src/, build.rs, Cargo.toml, Cargo.lock) differ from the commit gets "-dirty" appended.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=PACSGATE_COMMIT");
    // Sources: build.rs reruns when they change (they rebuild the crate anyway), to redo the dirty check.
    for path in ["src", "build.rs", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={path}");
    }
    let commit = match std::env::var("PACSGATE_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => from_git().unwrap_or_else(|| "unknown".to_string()),
    };
    println!("cargo:rustc-env=PACSGATE_COMMIT={commit}");
}

/// Only files that exist: a missing one would rerun the script on every build.
fn rerun_if_changed(path: PathBuf) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn from_git() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    // A new commit or a checkout changes HEAD or the ref it points to (loose or packed).
    if let Some(dir) = git(&["rev-parse", "--git-dir"]) {
        rerun_if_changed(PathBuf::from(dir).join("HEAD"));
    }
    if let Some(common) = git(&["rev-parse", "--git-common-dir"]) {
        let common = PathBuf::from(common);
        rerun_if_changed(common.join("packed-refs"));
        if let Some(head) = git(&["symbolic-ref", "-q", "HEAD"]) {
            rerun_if_changed(common.join(head));
        }
    }
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        "src",
        "build.rs",
        "Cargo.toml",
        "Cargo.lock",
    ])
    .is_some_and(|s| !s.is_empty());
    Some(if dirty {
        format!("{commit}-dirty")
    } else {
        commit
    })
}
