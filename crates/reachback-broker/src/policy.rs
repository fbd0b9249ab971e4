//! The access policy the broker evaluates, built from the stored segment and policy
//! documents.

use reachback_policy::{Action, PolicySet, Rule, Segment, parse_cidr, parse_destination, parse_port_range};
use reachback_store::DocRow;
use serde_json::Value;

fn text_list(spec: &Value, key: &str) -> Vec<String> {
    spec[key].as_array().map(|items| items.iter().filter_map(|item| item.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// Builds the evaluator from stored rows (validated when written).
pub fn compile_policy(segments: &[DocRow], policies: &[DocRow]) -> PolicySet {
    let segments = segments
        .iter()
        .map(|doc| Segment {
            id: doc.id.clone(),
            name: doc.name.clone(),
            destinations: text_list(&doc.spec, "destinations").iter().filter_map(|text| parse_destination(text).ok()).collect(),
            tcp_ports: text_list(&doc.spec, "tcp_ports").iter().filter_map(|text| parse_port_range(text).ok()).collect(),
            udp_ports: text_list(&doc.spec, "udp_ports").iter().filter_map(|text| parse_port_range(text).ok()).collect(),
            enabled: doc.enabled,
        })
        .collect();
    let rules = policies
        .iter()
        .map(|doc| Rule {
            id: doc.id.clone(),
            name: doc.name.clone(),
            order: doc.position,
            action: if doc.spec["action"] == "allow" { Action::Allow } else { Action::Deny },
            segment_ids: text_list(&doc.spec, "segment_ids"),
            connector_ids: text_list(&doc.spec, "connector_ids"),
            source_cidrs: text_list(&doc.spec, "source_cidrs").iter().filter_map(|text| parse_cidr(text).ok()).collect(),
            usernames: text_list(&doc.spec, "usernames"),
            platforms: text_list(&doc.spec, "platforms"),
            range_ids: text_list(&doc.spec, "range_ids"),
            enabled: doc.enabled,
        })
        .collect();
    PolicySet::new(segments, rules)
}
