//! The interception rules: an nftables table with TPROXY rules (TCP and UDP) for
//! the virtual ranges, and policy routing that delivers marked packets locally. Applied with
//! the `nft` and `ip` tools (nftables and iproute2), replaced as a whole when the
//! ranges change, removed on exit.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::Context;

/// Names and numbers the rules use (configurable so two connectors can share a host in tests).
#[derive(Clone, Debug)]
pub struct Routing {
    pub table: String,
    pub fwmark: u32,
    pub route_table: u32,
}

impl Default for Routing {
    fn default() -> Self {
        Routing { table: "reachback".into(), fwmark: 0x1, route_table: 100 }
    }
}

/// The nftables script for a set of ranges (`100.64.0.0/16`, `100.65.0.10-100.65.0.200`, IPv6 alike).
pub fn ruleset(routing: &Routing, ranges: &[String], port: u16) -> String {
    let (v6, v4): (Vec<&String>, Vec<&String>) = ranges.iter().partition(|range| range.contains(':'));
    let mut script = format!(
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{\n  chain prerouting {{\n    type filter hook prerouting priority mangle; policy accept;\n",
        table = routing.table
    );
    if !v4.is_empty() {
        let set = v4.iter().map(|range| range.as_str()).collect::<Vec<_>>().join(", ");
        // no server has a virtual address: such a source is forged (a reply to it would loop back in)
        script.push_str(&format!("    ip saddr {{ {set} }} drop\n"));
        for protocol in ["tcp", "udp"] {
            script.push_str(&format!("    ip daddr {{ {set} }} meta l4proto {protocol} tproxy ip to :{port} meta mark set {:#x} accept\n", routing.fwmark));
        }
    }
    if !v6.is_empty() {
        let set = v6.iter().map(|range| range.as_str()).collect::<Vec<_>>().join(", ");
        script.push_str(&format!("    ip6 saddr {{ {set} }} drop\n"));
        for protocol in ["tcp", "udp"] {
            script.push_str(&format!("    ip6 daddr {{ {set} }} meta l4proto {protocol} tproxy ip6 to :{port} meta mark set {:#x} accept\n", routing.fwmark));
        }
    }
    script.push_str("  }\n}\n");
    script
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new(program).args(args).output().with_context(|| format!("running {program} (is it installed?)"))
}

fn ensure_rule(family: &str, routing: &Routing) -> anyhow::Result<()> {
    let mark = routing.fwmark.to_string();
    let table = routing.route_table.to_string();
    let shown = run("ip", &[family, "rule", "show", "fwmark", &mark, "lookup", &table])?;
    if String::from_utf8_lossy(&shown.stdout).trim().is_empty() {
        let added = run("ip", &[family, "rule", "add", "fwmark", &mark, "lookup", &table])?;
        anyhow::ensure!(added.status.success(), "ip {family} rule add: {}", String::from_utf8_lossy(&added.stderr).trim());
    }
    let any = if family == "-6" { "::/0" } else { "0.0.0.0/0" };
    let route = run("ip", &[family, "route", "replace", "local", any, "dev", "lo", "table", &table])?;
    anyhow::ensure!(route.status.success(), "ip {family} route replace: {}", String::from_utf8_lossy(&route.stderr).trim());
    Ok(())
}

/// Installs (or replaces) the rules for `ranges`, intercepting to `port`.
pub fn install(routing: &Routing, ranges: &[String], port: u16) -> anyhow::Result<()> {
    let script = ruleset(routing, ranges, port);
    let mut child =
        Command::new("nft").args(["-f", "-"]).stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().context("running nft (is nftables installed?)")?;
    child.stdin.take().context("nft stdin")?.write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    anyhow::ensure!(output.status.success(), "nft refused the rules: {}", String::from_utf8_lossy(&output.stderr).trim());
    ensure_rule("-4", routing)?;
    if ranges.iter().any(|range| range.contains(':')) {
        ensure_rule("-6", routing)?;
    }
    Ok(())
}

/// Removes the table, the rules and the routes.
pub fn remove(routing: &Routing) -> anyhow::Result<()> {
    let mark = routing.fwmark.to_string();
    let table = routing.route_table.to_string();
    let deleted = run("nft", &["delete", "table", "inet", &routing.table])?;
    for family in ["-4", "-6"] {
        while run("ip", &[family, "rule", "del", "fwmark", &mark, "lookup", &table])?.status.success() {}
        let _ = run("ip", &[family, "route", "flush", "table", &table]);
    }
    anyhow::ensure!(deleted.status.success(), "nft delete table: {}", String::from_utf8_lossy(&deleted.stderr).trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ruleset_covers_both_families_and_ranges() {
        let script = ruleset(&Routing::default(), &["100.64.0.0/16".into(), "100.65.0.10-100.65.0.200".into(), "fd7a:115c::/64".into()], 15001);
        assert_eq!(
            script,
            "table inet reachback\ndelete table inet reachback\ntable inet reachback {\n  chain prerouting {\n    type filter hook prerouting priority mangle; policy accept;\n    \
             ip saddr { 100.64.0.0/16, 100.65.0.10-100.65.0.200 } drop\n    \
             ip daddr { 100.64.0.0/16, 100.65.0.10-100.65.0.200 } meta l4proto tcp tproxy ip to :15001 meta mark set 0x1 accept\n    \
             ip daddr { 100.64.0.0/16, 100.65.0.10-100.65.0.200 } meta l4proto udp tproxy ip to :15001 meta mark set 0x1 accept\n    \
             ip6 saddr { fd7a:115c::/64 } drop\n    \
             ip6 daddr { fd7a:115c::/64 } meta l4proto tcp tproxy ip6 to :15001 meta mark set 0x1 accept\n    \
             ip6 daddr { fd7a:115c::/64 } meta l4proto udp tproxy ip6 to :15001 meta mark set 0x1 accept\n  }\n}\n"
        );
    }
}
