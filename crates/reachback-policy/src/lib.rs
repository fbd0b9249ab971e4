//! Application segments and access policies, and the decision for one new flow.
//! Pure: no I/O, no async, no SQL. The API validates input with the parsers here;
//! the broker compiles a [`PolicySet`] from stored rows and asks it about every flow.
//!
//! Semantics: rules are tried by `order` (ties by id), the first *enabled* rule
//! whose every condition matches decides; no match denies. An empty condition list
//! means "any". A rule's segment condition matches when any of its listed segments
//! that is enabled contains the destination and port; a rule that lists only
//! disabled segments matches nothing.

mod parse;

use std::collections::HashMap;
use std::net::IpAddr;

pub use parse::{Cidr, Destination, ParseError, PortRange, parse_cidr, parse_destination, parse_port_range};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub id: String,
    pub name: String,
    pub destinations: Vec<Destination>,
    pub tcp_ports: Vec<PortRange>,
    pub udp_ports: Vec<PortRange>,
    pub enabled: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub id: String,
    pub name: String,
    pub order: i64,
    pub action: Action,
    pub segment_ids: Vec<String>,
    pub connector_ids: Vec<String>,
    pub source_cidrs: Vec<Cidr>,
    /// compared case-insensitively
    pub usernames: Vec<String>,
    pub platforms: Vec<String>,
    pub range_ids: Vec<String>,
    pub enabled: bool,
}

/// What the broker knows about a new flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowFacts<'a> {
    pub protocol: Protocol,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub port: u16,
    pub connector_id: &'a str,
    pub client_hostname: &'a str,
    pub username: &'a str,
    pub platform: &'a str,
    pub range_id: &'a str,
}

/// The outcome for one flow: the action and the rule that decided (`None`: default deny).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub rule_id: Option<String>,
    pub rule_name: Option<String>,
}

impl Segment {
    pub fn contains(&self, facts: &FlowFacts<'_>) -> bool {
        let ports = match facts.protocol {
            Protocol::Tcp => &self.tcp_ports,
            Protocol::Udp => &self.udp_ports,
        };
        self.enabled
            && ports.iter().any(|range| range.contains(facts.port))
            && self.destinations.iter().any(|destination| destination.matches(facts.destination, facts.client_hostname))
    }
}

/// The rules in evaluation order with their segments, ready for many flows.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    rules: Vec<Rule>,
    segments: HashMap<String, Segment>,
}

impl PolicySet {
    pub fn new(segments: Vec<Segment>, mut rules: Vec<Rule>) -> Self {
        rules.retain(|rule| rule.enabled);
        rules.sort_by(|a, b| a.order.cmp(&b.order).then_with(|| a.id.cmp(&b.id)));
        let segments = segments.into_iter().map(|segment| (segment.id.clone(), segment)).collect();
        PolicySet { rules, segments }
    }

    pub fn evaluate(&self, facts: &FlowFacts<'_>) -> Decision {
        for rule in &self.rules {
            if self.rule_matches(rule, facts) {
                return Decision { action: rule.action, rule_id: Some(rule.id.clone()), rule_name: Some(rule.name.clone()) };
            }
        }
        Decision { action: Action::Deny, rule_id: None, rule_name: None }
    }

    fn rule_matches(&self, rule: &Rule, facts: &FlowFacts<'_>) -> bool {
        let any_or = |list: &[String], value: &str| list.is_empty() || list.iter().any(|item| item == value);
        let segments = rule.segment_ids.is_empty() || rule.segment_ids.iter().any(|id| self.segments.get(id).is_some_and(|segment| segment.contains(facts)));
        segments
            && any_or(&rule.connector_ids, facts.connector_id)
            && (rule.source_cidrs.is_empty() || rule.source_cidrs.iter().any(|cidr| cidr.contains(facts.source)))
            && (rule.usernames.is_empty() || rule.usernames.iter().any(|name| name.eq_ignore_ascii_case(facts.username)))
            && (rule.platforms.is_empty() || rule.platforms.iter().any(|platform| platform.eq_ignore_ascii_case(facts.platform)))
            && any_or(&rule.range_ids, facts.range_id)
    }
}

#[cfg(test)]
mod tests;
