//! Allocation engine throughput: allocations per second with 1,000,000 bindings
//! across 200 ranges, clients spread over the ranges' locations. Prints figures;
//! run with `cargo bench -p reachback-ipam --bench allocation`.

use std::collections::{BTreeSet, HashMap};
use std::time::Instant;

use reachback_ipam::{AddressRange, Engine, Location, Place, RangeSpec};

const RANGES: u32 = 200;
const PRELOADED: u32 = 5_000; // per range: 1,000,000 in all
const ALLOCATIONS: usize = 1_000_000;
const ROUNDS: usize = 5;

fn location(index: u32) -> Location {
    Location {
        city: Some(format!("city{}", index % 50)),
        state: Some(format!("state{}", index % 20)),
        country: Some(["FR", "DE", "JP", "US", "GB"][(index % 5) as usize].to_string()),
        latitude: Some(f64::from(index % 90)),
        longitude: Some(f64::from(index % 180)),
    }
}

fn build() -> Engine {
    let mut engine = Engine::new(3_600_000_000);
    for index in 0..RANGES {
        // 200 /16s carved out of 100.64.0.0/10 and beyond: 65,534 addresses each
        let base = 0x6440_0000u32 + (index << 16);
        let text = format!("{}/16", std::net::Ipv4Addr::from(base));
        let spec = RangeSpec {
            id: format!("range{index:03}"),
            name: format!("range {index:03}"),
            range: AddressRange::parse(&text).expect("range"),
            location: Some(location(index)),
            enabled: true,
        };
        let first = u128::from(base) + 1;
        engine.load_range(spec, (0..PRELOADED).map(|offset| first + u128::from(offset)), []).expect("load");
    }
    engine
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let places: Vec<Place> = (0..1000u32).map(|index| Place::new(Some(&location(index * 7)))).collect();
    let mut rates = Vec::new();
    let mut baseline_rates = Vec::new();
    let mut load_times = Vec::new();
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let mut engine = build();
        load_times.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        let mut allocated = 0usize;
        for index in 0..ALLOCATIONS {
            if engine.plan(&places[index % places.len()], 0).is_ok() {
                allocated += 1;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(allocated, ALLOCATIONS);
        rates.push(ALLOCATIONS as f64 / elapsed);
        // baseline on the same machine in the same run: inserting the same number of
        // addresses into a plain ordered set and a hash map (what any allocator must at least do)
        let started = Instant::now();
        let mut set = BTreeSet::new();
        let mut map = HashMap::new();
        for value in 0..ALLOCATIONS as u128 {
            set.insert(value * 3);
            map.insert(value, value);
        }
        std::hint::black_box((&set, &map));
        baseline_rates.push(ALLOCATIONS as f64 / started.elapsed().as_secs_f64());
    }
    let rate = median(rates);
    let baseline = median(baseline_rates);
    println!("allocation engine: {RANGES} ranges, {} preloaded bindings, {ALLOCATIONS} allocations per round, {ROUNDS} rounds", RANGES * PRELOADED);
    println!("  load 1,000,000 bindings into the engine: median {:.3} s", median(load_times));
    println!("  allocations per second: median {:.0}", rate);
    println!("  baseline (BTreeSet + HashMap insert per address): median {:.0}/s; engine/baseline = {:.2}", baseline, rate / baseline);
}
