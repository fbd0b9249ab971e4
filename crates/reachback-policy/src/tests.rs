//! Data-driven tests of the evaluator: a table of flows and the expected decision.
#![allow(clippy::unwrap_used)]

use super::*;

fn segment(id: &str, destinations: &[&str], tcp: &[&str], enabled: bool) -> Segment {
    Segment {
        id: id.to_string(),
        name: format!("segment {id}"),
        destinations: destinations.iter().map(|text| parse_destination(text).unwrap()).collect(),
        tcp_ports: tcp.iter().map(|text| parse_port_range(text).unwrap()).collect(),
        udp_ports: Vec::new(),
        enabled,
    }
}

fn rule(id: &str, order: i64, action: Action, segments: &[&str]) -> Rule {
    Rule {
        id: id.to_string(),
        name: format!("rule {id}"),
        order,
        action,
        segment_ids: segments.iter().map(|s| s.to_string()).collect(),
        connector_ids: Vec::new(),
        source_cidrs: Vec::new(),
        usernames: Vec::new(),
        platforms: Vec::new(),
        range_ids: Vec::new(),
        enabled: true,
    }
}

fn facts(destination: &str, port: u16) -> FlowFacts<'static> {
    FlowFacts {
        protocol: Protocol::Tcp,
        source: "10.1.0.5".parse().unwrap(),
        destination: destination.parse().unwrap(),
        port,
        connector_id: "conn-a",
        client_hostname: "alice-laptop.laptops.corp.example",
        username: "Alice@corp.example",
        platform: "windows",
        range_id: "range-paris",
    }
}

fn decide(set: &PolicySet, facts: &FlowFacts<'_>) -> String {
    let decision = set.evaluate(facts);
    format!("{:?} by {}", decision.action, decision.rule_id.as_deref().unwrap_or("default"))
}

#[test]
fn first_enabled_match_by_order_wins_and_nothing_matching_denies() {
    let segments = vec![
        segment("smb", &["100.64.0.0/16"], &["445"], true),
        segment("winrm", &["*.laptops.corp.example"], &["5985-5986"], true),
        segment("ssh-off", &["100.64.0.0/10"], &["22"], false),
    ];
    let mut block_one = rule("block-one", 1, Action::Deny, &["smb"]);
    block_one.source_cidrs = vec![parse_cidr("10.9.0.0/16").unwrap()];
    let mut disabled = rule("disabled-allow-all", 0, Action::Allow, &[]);
    disabled.enabled = false;
    let mut alice_only = rule("alice-winrm", 3, Action::Allow, &["winrm"]);
    alice_only.usernames = vec!["alice@CORP.example".to_string()];
    alice_only.platforms = vec!["windows".to_string()];
    let mut other_connector = rule("other-connector", 4, Action::Allow, &["smb"]);
    other_connector.connector_ids = vec!["conn-b".to_string()];
    let set = PolicySet::new(
        segments,
        vec![rule("smb-allow", 2, Action::Allow, &["smb"]), block_one, disabled, alice_only, other_connector, rule("ssh", 5, Action::Allow, &["ssh-off"])],
    );

    let mut from_blocked = facts("100.64.3.7", 445);
    from_blocked.source = "10.9.1.1".parse().unwrap();
    let mut bob = facts("100.70.0.1", 5985);
    bob.username = "bob@corp.example";
    let mut other_host = facts("100.70.0.1", 5986);
    other_host.client_hostname = "printer.corp.example";
    let table = [
        (facts("100.64.3.7", 445), "Allow by smb-allow"),
        (from_blocked, "Deny by block-one"),
        (facts("100.65.0.1", 445), "Deny by default"),
        (facts("100.64.3.7", 446), "Deny by default"),
        (facts("100.70.0.1", 5986), "Allow by alice-winrm"),
        (bob, "Deny by default"),
        (other_host, "Deny by default"),
        (facts("100.64.3.7", 22), "Deny by default"),
    ];
    for (facts, expected) in table {
        assert_eq!(decide(&set, &facts), expected, "{facts:?}");
    }
}

#[test]
fn empty_lists_mean_any_and_ties_go_by_id() {
    let set = PolicySet::new(Vec::new(), vec![rule("b", 1, Action::Deny, &[]), rule("a", 1, Action::Allow, &[])]);
    assert_eq!(decide(&set, &facts("100.64.0.1", 1)), "Allow by a");
    let mut udp = facts("100.64.0.1", 53);
    udp.protocol = Protocol::Udp;
    let set = PolicySet::new(vec![segment("tcp-only", &["100.64.0.0/10"], &["1-65535"], true)], vec![rule("r", 1, Action::Allow, &["tcp-only"])]);
    assert_eq!(decide(&set, &udp), "Deny by default");
    assert_eq!(decide(&PolicySet::default(), &facts("100.64.0.1", 22)), "Deny by default");
}

#[test]
fn parsers_accept_canonical_values_and_refuse_the_rest() {
    let accepted = [
        ("100.64.0.0/16", "100.64.0.0/16"),
        ("100.64.3.7", "100.64.3.7"),
        ("fd7a:115c::/64", "fd7a:115c::/64"),
        ("*.Laptops.corp.example", "*.laptops.corp.example"),
        ("Alice-PC.corp.example", "alice-pc.corp.example"),
        ("0.0.0.0/0", "0.0.0.0/0"),
    ];
    for (text, canonical) in accepted {
        assert_eq!(parse_destination(text).unwrap().to_string(), canonical, "{text}");
    }
    for text in ["", "*", "*.", "*.com-", "100.64.0.5/16", "100.64.0.0/33", "1.2.3", "100.64.0.0/+8", "100.64.0.0/", "<script>", "a..b"] {
        assert!(parse_destination(text).is_err(), "{text:?} accepted");
    }
    assert_eq!(parse_cidr("100.64.0.5/16").unwrap_err().to_string(), "\"100.64.0.5/16\" has host bits set; did you mean 100.64.0.0/16?");
    assert_eq!(parse_port_range("5985-5986").unwrap().to_string(), "5985-5986");
    assert_eq!(parse_port_range("22").unwrap().to_string(), "22");
    for text in ["0", "65536", "10-5", "a", "", "-", "1-", "22-22-23"] {
        assert!(parse_port_range(text).is_err(), "{text:?} accepted");
    }
    assert!(parse_cidr("10.0.0.0/8").unwrap().contains("10.255.0.1".parse().unwrap()));
    assert!(!parse_cidr("10.0.0.0/8").unwrap().contains("fd00::1".parse().unwrap()));
    assert!(parse_cidr("::/0").unwrap().contains("fd00::1".parse().unwrap()));
}
