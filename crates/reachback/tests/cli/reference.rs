//! docs/cli-reference.md is the binary's `--help`, command by command: rendered by
//! `scripts/cli-reference` (which also makes the Debian package's man page), and
//! current, or this test fails and names the command to run.

use std::process::Command;

use crate::process::BIN;

#[test]
fn cli_reference_is_current() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/cli-reference");
    let output = Command::new(script).args(["--check", BIN]).output().expect("scripts/cli-reference runs");
    assert!(output.status.success(), "{}\nregenerate it with: scripts/cli-reference target/debug/reachback", String::from_utf8_lossy(&output.stderr));
}
