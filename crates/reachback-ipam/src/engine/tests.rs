//! Engine tests: examples, and a property test against a plain reference model.

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

fn place(country: &str, state: &str, city: &str) -> Location {
    let some = |value: &str| (!value.is_empty()).then(|| value.to_string());
    Location { country: some(country), state: some(state), city: some(city), ..Location::default() }
}

fn spec(id: &str, range: &str, location: Option<Location>) -> RangeSpec {
    RangeSpec { id: id.into(), name: id.into(), range: AddressRange::parse(range).unwrap(), location, enabled: true }
}

fn addr(allocation: &Allocation) -> String {
    crate::range::join_address(allocation.family, allocation.value).to_string()
}

#[test]
fn location_fit_then_size_then_name() {
    let mut engine = Engine::new(3600);
    engine.load_range(spec("paris", "100.64.0.0/30", Some(place("FR", "IDF", "Paris"))), [], []).unwrap();
    engine.load_range(spec("idf", "100.64.1.0/24", Some(place("FR", "IDF", ""))), [], []).unwrap();
    engine.load_range(spec("tokyo", "100.64.2.0/24", Some(place("JP", "Tokyo", "Tokyo"))), [], []).unwrap();
    engine.load_range(spec("global", "100.64.3.0/24", None), [], []).unwrap();
    let paris = Place::new(Some(&place("fr", "idf", "paris")));
    let osaka = Place::new(Some(&place("JP", "Osaka", "Osaka")));
    let nowhere = Place::new(None);
    let berlin = Place::new(Some(&place("DE", "", "Berlin")));
    let plans: Vec<String> = [&paris, &paris, &paris, &osaka, &nowhere, &berlin]
        .iter()
        .map(|place| engine.plan(place, 0).map(|a| format!("{} {} {:?}", a.range_id, addr(&a), a.tier)).unwrap())
        .collect();
    assert_eq!(
        plans,
        [
            "paris 100.64.0.1 City",
            "paris 100.64.0.2 City",
            "idf 100.64.1.1 State",
            "tokyo 100.64.2.1 Country",
            "global 100.64.3.1 Global",
            "global 100.64.3.2 Global",
        ]
    );
}

#[test]
fn fallback_prefers_nearest_range() {
    let mut engine = Engine::new(0);
    let mut london = place("GB", "England", "London");
    london.latitude = Some(51.5);
    london.longitude = Some(-0.12);
    let mut tokyo = place("JP", "Tokyo", "Tokyo");
    tokyo.latitude = Some(35.7);
    tokyo.longitude = Some(139.7);
    engine.load_range(spec("a-tokyo", "100.64.0.0/24", Some(tokyo)), [], []).unwrap();
    engine.load_range(spec("b-london", "100.64.1.0/30", Some(london)), [], []).unwrap();
    let mut paris = place("FR", "IDF", "Paris");
    paris.latitude = Some(48.85);
    paris.longitude = Some(2.35);
    let paris = Place::new(Some(&paris));
    let picks: Vec<_> = (0..3).map(|_| engine.plan(&paris, 0).unwrap().range_id).collect();
    assert_eq!(picks, ["b-london", "b-london", "a-tokyo"]);
}

#[test]
fn quarantine_and_exhaustion() {
    let mut engine = Engine::new(100);
    engine.load_range(spec("r", "100.64.0.0/30", None), [], []).unwrap();
    let any = Place::new(None);
    let first = engine.plan(&any, 0).unwrap();
    let second = engine.plan(&any, 0).unwrap();
    assert_eq!((addr(&first), addr(&second)), ("100.64.0.1".into(), "100.64.0.2".into()));
    assert_eq!(engine.plan(&any, 0), Err(AllocationError::Exhausted));
    engine.release("r", second.value, 10);
    engine.release("r", first.value, 20);
    assert_eq!(engine.used("r"), Some(0));
    // only quarantined addresses are left: oldest release first
    let reused = engine.plan(&any, 30).unwrap();
    assert_eq!((addr(&reused), reused.quarantined_since), ("100.64.0.2".into(), Some(10)));
    engine.unreserve(&reused);
    // once quarantine has run out, the lowest address again
    let after = engine.plan(&any, 200).unwrap();
    assert_eq!((addr(&after), after.quarantined_since), ("100.64.0.1".into(), None));
}

#[test]
fn overlap_and_disable() {
    let mut engine = Engine::new(0);
    engine.load_range(spec("a", "100.64.0.0/24", None), [], []).unwrap();
    assert_eq!(engine.load_range(spec("b", "100.64.0.128/25", None), [], []), Err(EngineError::Overlap("a".into())));
    engine.update_range("a", "a", None, false).unwrap();
    assert_eq!(engine.plan(&Place::new(None), 0), Err(AllocationError::Exhausted));
}

#[test]
fn ipv6_slash64_is_one_interval() {
    let mut engine = Engine::new(0);
    engine.load_range(spec("v6", "fd7a:115c::/64", None), [], []).unwrap();
    let allocation = engine.plan(&Place::new(None), 0).unwrap();
    assert_eq!(addr(&allocation), "fd7a:115c::1");
    assert_eq!(engine.used("v6"), Some(1));
}

/// A range in the model: its spec, the addresses bound, and the quarantined ones with their ends.
type ModelRange = (RangeSpec, BTreeSet<u128>, BTreeMap<u128, i64>);

/// The reference model: plain sets, every rule spelled out the slow way.
#[derive(Clone, Debug, Default)]
struct Model {
    ranges: BTreeMap<String, ModelRange>,
}

impl Model {
    fn plan(&mut self, client: Option<&Location>, now: i64, quarantine: i64) -> Option<(String, u128)> {
        let mut candidates = Vec::new();
        for (id, (spec, bound, _)) in &self.ranges {
            let (first, last) = spec.range.assignable();
            let unbound = (last - first + 1) - bound.len() as u128;
            if !spec.enabled || unbound == 0 {
                continue;
            }
            let tier = Location::tier_of(client, spec.location.as_ref());
            let distance = match (client.and_then(Location::coordinates), spec.location.as_ref().and_then(Location::coordinates)) {
                (Some(a), Some(b)) if tier == LocationTier::Fallback => great_circle_km(a, b),
                _ => f64::INFINITY,
            };
            candidates.push((tier, distance, unbound, spec.name.clone(), id.clone()));
        }
        candidates.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(b.2.cmp(&a.2)).then(a.3.cmp(&b.3)).then(a.4.cmp(&b.4)));
        let best = candidates.into_iter().next();
        let id = best?.4;
        let (spec, bound, quarantined) = self.ranges.get_mut(&id)?;
        let (first, last) = spec.range.assignable();
        let fresh = (first..=last).find(|value| !bound.contains(value) && quarantined.get(value).is_none_or(|&released| released + quarantine <= now));
        let value = match fresh {
            Some(value) => value,
            None => *quarantined.iter().min_by_key(|(value, released)| (**released, **value))?.0,
        };
        quarantined.remove(&value);
        bound.insert(value);
        Some((id, value))
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create(usize, usize),
    Enroll(usize),
    Release(usize),
    Toggle(usize),
    Delete(usize),
    Restart,
    Tick(i64),
}

const CANDIDATE_RANGES: &[&str] = &["100.64.0.0/29", "100.64.0.4-100.64.0.12", "100.64.1.0/30", "100.64.2.0/31", "fd00::/125", "100.64.3.7", "100.64.0.16/28"];

fn locations() -> Vec<Option<Location>> {
    let mut near = place("FR", "IDF", "Paris");
    near.latitude = Some(48.0);
    near.longitude = Some(2.0);
    let mut far = place("JP", "Tokyo", "Tokyo");
    far.latitude = Some(35.0);
    far.longitude = Some(139.0);
    vec![
        None,
        Some(place("FR", "IDF", "Paris")),
        Some(place("FR", "IDF", "")),
        Some(place("FR", "", "")),
        Some(near),
        Some(far),
        Some(place("DE", "Berlin", "Berlin")),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..CANDIDATE_RANGES.len(), 0..7usize).prop_map(|(r, l)| Op::Create(r, l)),
        4 => (0..7usize).prop_map(Op::Enroll),
        2 => (0..64usize).prop_map(Op::Release),
        1 => (0..8usize).prop_map(Op::Toggle),
        1 => (0..8usize).prop_map(Op::Delete),
        1 => Just(Op::Restart),
        1 => (0..60i64).prop_map(Op::Tick),
    ]
}

fn rebuild(model: &Model, quarantine: i64) -> Engine {
    let mut engine = Engine::new(quarantine);
    for (spec, bound, quarantined) in model.ranges.values() {
        engine.load_range(spec.clone(), bound.iter().copied(), quarantined.iter().map(|(&v, &t)| (v, t))).unwrap();
    }
    engine
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn engine_matches_reference_model(ops in proptest::collection::vec(op(), 1..120), quarantine in prop_oneof![Just(0i64), Just(30i64)]) {
        let locations = locations();
        let mut model = Model::default();
        let mut engine = Engine::new(quarantine);
        let mut now = 0i64;
        let mut next_id = 0;
        for op in ops {
            match op {
                Op::Create(r, l) => {
                    let range = AddressRange::parse(CANDIDATE_RANGES[r]).unwrap();
                    let overlaps = model.ranges.values().any(|(spec, _, _)| spec.range.overlaps(&range));
                    next_id += 1;
                    let spec = RangeSpec { id: format!("r{next_id:03}"), name: format!("n{}", (next_id * 7) % 10), range, location: locations[l].clone(), enabled: true };
                    let result = engine.load_range(spec.clone(), [], []);
                    prop_assert_eq!(result.is_err(), overlaps);
                    if !overlaps { model.ranges.insert(spec.id.clone(), (spec, BTreeSet::new(), BTreeMap::new())); }
                }
                Op::Enroll(l) => {
                    let expected = model.plan(locations[l].as_ref(), now, quarantine);
                    let got = engine.plan(&Place::new(locations[l].as_ref()), now).ok().map(|a| (a.range_id, a.value));
                    prop_assert_eq!(got, expected);
                }
                Op::Release(n) => {
                    let all: Vec<(String, u128)> = model.ranges.iter().flat_map(|(id, (_, bound, _))| bound.iter().map(move |v| (id.clone(), *v))).collect();
                    if !all.is_empty() {
                        let (id, value) = all[n % all.len()].clone();
                        let entry = model.ranges.get_mut(&id).unwrap();
                        entry.1.remove(&value);
                        if quarantine > 0 { entry.2.insert(value, now); }
                        engine.release(&id, value, now);
                    }
                }
                Op::Toggle(n) => {
                    let ids: Vec<String> = model.ranges.keys().cloned().collect();
                    if !ids.is_empty() {
                        let id = &ids[n % ids.len()];
                        let spec = &mut model.ranges.get_mut(id).unwrap().0;
                        spec.enabled = !spec.enabled;
                        engine.update_range(id, &spec.name, spec.location.clone(), spec.enabled).unwrap();
                    }
                }
                Op::Delete(n) => {
                    let ids: Vec<String> = model.ranges.keys().cloned().collect();
                    if !ids.is_empty() {
                        let id = ids[n % ids.len()].clone();
                        model.ranges.remove(&id);
                        engine.remove_range(&id);
                    }
                }
                Op::Restart => engine = rebuild(&model, quarantine),
                Op::Tick(seconds) => now += seconds,
            }
            // invariants: used counts equal bindings, every bound address inside its range, no duplicates
            let mut seen = BTreeSet::new();
            for (id, (spec, bound, _)) in &model.ranges {
                prop_assert_eq!(engine.used(id), Some(bound.len() as u128));
                for (n, &value) in bound.iter().enumerate() {
                    prop_assert_eq!(engine.nth_bound(id, n as u128, false), Some(value));
                    prop_assert_eq!(engine.nth_bound(id, n as u128, true), bound.iter().rev().nth(n).copied());
                }
                prop_assert_eq!(engine.nth_bound(id, bound.len() as u128, false), None);
                for &value in bound {
                    prop_assert!(spec.range.is_assignable(spec.range.family(), value));
                    prop_assert!(seen.insert((spec.range.family(), value)));
                }
            }
        }
    }
}
