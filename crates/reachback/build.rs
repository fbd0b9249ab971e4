//! Links `reachback` with packed relative relocations (DT_RELR) where the
//! toolchain and the C library can: the binary's ~24,000 relative relocations
//! then take 6 KiB instead of 580 KiB, which the dynamic loader otherwise reads
//! into every process at start — about 1 MiB of the agent's resident memory
//! (docs/benchmarks.md, seventh session). GNU ld 2.38 and glibc 2.36 are needed;
//! a probe program is linked and run first, and without them the flag is left out.

use std::path::PathBuf;
use std::process::Command;

const FLAG: &str = "-Wl,-z,pack-relative-relocs";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CC");
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let target_env = std::env::var("CARGO_CFG_TARGET_ENV").unwrap_or_default();
    let cross = std::env::var("TARGET").ok() != std::env::var("HOST").ok();
    if target_os != "linux" || target_env != "gnu" || cross {
        return;
    }
    if probe() {
        println!("cargo:rustc-link-arg-bins={FLAG}");
    } else {
        println!("cargo:warning=the linker or C library cannot pack relative relocations; linking without {FLAG}");
    }
}

/// Links a position-independent program with a relative relocation using the
/// flag, and runs it: both the linker and the loader must understand DT_RELR.
fn probe() -> bool {
    let Some(out) = std::env::var_os("OUT_DIR").map(PathBuf::from) else { return false };
    let source = out.join("relr_probe.c");
    let program = out.join("relr_probe");
    let text = "static const char *greeting = \"relr\";\nint main(void) { return greeting[0] == 'r' ? 0 : 1; }\n";
    if std::fs::write(&source, text).is_err() {
        return false;
    }
    let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let linked = Command::new(compiler).args(["-fPIE", "-pie", FLAG, "-o"]).arg(&program).arg(&source).output();
    if !linked.is_ok_and(|output| output.status.success()) {
        return false;
    }
    Command::new(&program).status().is_ok_and(|status| status.success())
}
