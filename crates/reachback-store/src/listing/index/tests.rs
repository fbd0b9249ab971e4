use super::*;

/// A small deterministic generator (xorshift).
struct Draw(u64);

impl Draw {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound.max(1)
    }
}

fn key(family: u8, value: u128) -> Key {
    let mut key = [0u8; 17];
    key[0] = family;
    key[1..].copy_from_slice(&value.to_be_bytes());
    key
}

fn row(draw: &mut Draw, n: u64) -> IndexedRow {
    let (family, value) = match draw.below(10) {
        0 => (6, 0xfd00u128 << 112 | u128::from(n)),
        1 => (6, u128::from(n)), // a low IPv6 value: packs like an IPv4 one
        _ => (4, 0x6440_0000 + u128::from(n)),
    };
    IndexedRow {
        key: key(family, value),
        range_id: format!("range{}", draw.below(5)),
        device_id: format!("dev{n}"),
        username: ["alice", "Bob", "bob", "carol@corp", "Ärger", "dave"][draw.below(6) as usize].to_string(),
        platform: ["windows", "macos", "linux"][draw.below(3) as usize].to_string(),
        client_hostname: format!("h{}-{}.example", draw.below(50), ["lt", "WS"][draw.below(2) as usize]),
        last_updated: draw.below(40) as i64 - 20,
    }
}

/// The reference: filter every row, sort by the column then the key, cut the page.
fn reference(rows: &[IndexedRow], selection: &Selection, fold: Fold, offset: usize, limit: usize) -> (usize, Vec<Key>) {
    let contains = |value: &str, needle: &Option<String>| needle.as_ref().is_none_or(|needle| fold.apply(value).contains(&fold.apply(needle)));
    let mut matching: Vec<&IndexedRow> = rows
        .iter()
        .filter(|row| selection.ranges.as_ref().is_none_or(|ranges| ranges.contains(&row.range_id)))
        .filter(|row| selection.ip.is_none_or(|(first, last)| row.key >= first && row.key <= last))
        .filter(|row| contains(&row.username, &selection.username))
        .filter(|row| contains(&row.platform, &selection.platform))
        .filter(|row| contains(&row.client_hostname, &selection.client_hostname))
        .filter(|row| selection.updated_after.is_none_or(|after| row.last_updated > after))
        .filter(|row| selection.updated_before.is_none_or(|before| row.last_updated < before))
        .collect();
    let rank = |id: &str| selection.range_order.iter().position(|other| other == id).unwrap_or(usize::MAX);
    matching.sort_by(|left, right| {
        let ordering = match selection.order.unwrap_or(Order::Ip) {
            Order::Ip => Ordering::Equal,
            Order::Username => left.username.as_bytes().cmp(right.username.as_bytes()),
            Order::Platform => left.platform.cmp(&right.platform),
            Order::ClientHostname => left.client_hostname.cmp(&right.client_hostname),
            Order::RangeName => rank(&left.range_id).cmp(&rank(&right.range_id)),
            Order::LastUpdated => left.last_updated.cmp(&right.last_updated),
        }
        .then(left.key.cmp(&right.key));
        if selection.descending { ordering.reverse() } else { ordering }
    });
    let total = matching.len();
    let end = if limit == 0 { total } else { (offset + limit).min(total) };
    (total, matching.get(offset.min(total)..end.max(offset.min(total))).unwrap_or(&[]).iter().map(|row| row.key).collect())
}

fn draw_selection(draw: &mut Draw) -> Selection {
    let orders = [Order::Ip, Order::Username, Order::Platform, Order::ClientHostname, Order::RangeName, Order::LastUpdated];
    let pick =
        |draw: &mut Draw, values: &[&str]| -> Option<String> { (draw.below(3) == 0).then(|| values[draw.below(values.len() as u64) as usize].to_string()) };
    Selection {
        ranges: (draw.below(4) == 0).then(|| {
            let count = draw.below(3) + 1;
            (0..count).map(|_| format!("range{}", draw.below(6))).collect()
        }),
        range_order: vec!["range3".into(), "range0".into(), "range4".into(), "range1".into(), "range2".into()],
        ip: (draw.below(4) == 0).then(|| {
            let first = 0x6440_0000 + u128::from(draw.below(300));
            (key(4, first), key(4, first + u128::from(draw.below(200))))
        }),
        username: pick(draw, &["BOB", "o", "ä", "Ä", "corp", "zzz", "@"]),
        platform: pick(draw, &["WIN", "os", "linux"]),
        // "new1", "w" and "e" match values the churn adds and removes: kept answers must follow
        client_hostname: pick(draw, &["h1", "-ws", "7-LT", ".example", "none", "new1", "w", "e", ""]),
        updated_after: (draw.below(4) == 0).then(|| draw.below(40) as i64 - 25),
        updated_before: (draw.below(4) == 0).then(|| draw.below(40) as i64 - 15),
        order: Some(orders[draw.below(6) as usize]),
        descending: draw.below(2) == 1,
    }
}

#[test]
fn every_selection_and_page_agrees_with_sorting_every_row() {
    for fold in [Fold::Ascii, Fold::Unicode] {
        let mut draw = Draw(0x9e37_79b9_7f4a_7c15);
        let mut rows: Vec<IndexedRow> = Vec::new();
        let mut index = ListingIndex::build(fold, Vec::new());
        for n in 0..600u64 {
            let row = row(&mut draw, n);
            rows.retain(|other| other.key != row.key);
            rows.push(row.clone());
            index.upsert(row);
        }
        for round in 0..3000 {
            // churn: replace, remove, add
            match draw.below(4) {
                0 if !rows.is_empty() => {
                    let at = draw.below(rows.len() as u64) as usize;
                    let gone = rows.swap_remove(at);
                    index.remove(&gone.key);
                }
                1 => {
                    let n = draw.below(700);
                    let mut row = row(&mut draw, n);
                    row.client_hostname = format!("new{}", draw.below(1000));
                    rows.retain(|other| other.key != row.key);
                    rows.push(row.clone());
                    index.upsert(row);
                }
                _ => {}
            }
            let selection = draw_selection(&mut draw);
            let limit = [0usize, 1, 7, 50, 5000][draw.below(5) as usize];
            let offset = draw.below(rows.len() as u64 + 10) as usize;
            let offset = [0, offset, offset / 2][draw.below(3) as usize];
            if round % 10 == 0 {
                // the whole order, a chunk at a time
                let mut ordered = index.order_all(&selection);
                let chunk = [1usize, 3, 50][draw.below(3) as usize];
                let mut keys = Vec::new();
                loop {
                    let next = ordered.next_chunk(chunk);
                    if next.is_empty() {
                        break;
                    }
                    keys.extend(next);
                }
                assert_eq!((ordered.len(), keys), reference(&rows, &selection, fold, 0, 0), "round {round}: ordered {selection:?}");
            }
            let expected = reference(&rows, &selection, fold, offset, limit);
            assert_eq!(index.select(&selection, offset, limit), expected, "round {round}: {selection:?} offset {offset} limit {limit} ({fold:?})");
        }
        assert_eq!(index.len(), rows.len());
    }
}

#[test]
fn built_at_once_equals_built_row_by_row() {
    let mut draw = Draw(7);
    let rows: Vec<IndexedRow> = (0..400).map(|n| row(&mut draw, n)).collect();
    let mut unique: Vec<IndexedRow> = Vec::new();
    for row in rows {
        unique.retain(|other| other.key != row.key);
        unique.push(row);
    }
    let built = ListingIndex::build(Fold::Ascii, unique.clone());
    let mut grown = ListingIndex::new(Fold::Ascii);
    for row in unique.iter().rev() {
        grown.upsert(row.clone());
    }
    for order in [Order::Username, Order::ClientHostname, Order::LastUpdated] {
        let selection = Selection { order: Some(order), ..Selection::default() };
        assert_eq!(built.select(&selection, 0, 0), grown.select(&selection, 0, 0));
    }
    assert_eq!(built.get(&unique[3].key), Some(unique[3].clone()));
}

#[test]
fn values_appended_in_order_do_not_relabel_each_time() {
    let mut index = ListingIndex::new(Fold::Ascii);
    for n in 0..10_000u32 {
        index.upsert(IndexedRow {
            key: key(4, u128::from(n)),
            range_id: "r".into(),
            device_id: format!("d{n}"),
            username: "u".into(),
            platform: "linux".into(),
            client_hostname: format!("host{n:06}"),
            last_updated: 0,
        });
    }
    assert!(index.dictionaries()[2].relabels() <= 2, "{} relabels", index.dictionaries()[2].relabels());
    let selection = Selection { order: Some(Order::ClientHostname), descending: true, ..Selection::default() };
    let (total, page) = index.select(&selection, 0, 2);
    assert_eq!((total, page), (10_000, vec![key(4, 9_999), key(4, 9_998)]));
}

#[test]
fn values_inserted_at_one_point_relabel_and_stay_ordered() {
    // every insert lands between the same two neighbours: the gap halves until it is
    // gone, then the dictionary relabels and the order holds
    let mut index = ListingIndex::new(Fold::Ascii);
    let mut names = vec!["a".to_string(), "b".to_string()];
    let mut current = "a".to_string();
    for _ in 0..200 {
        current.push('m');
        names.push(current.clone());
    }
    for (n, name) in names.iter().enumerate() {
        index.upsert(IndexedRow {
            key: key(4, n as u128),
            range_id: "r".into(),
            device_id: String::new(),
            username: name.clone(),
            platform: String::new(),
            client_hostname: String::new(),
            last_updated: 0,
        });
    }
    assert!(index.dictionaries()[0].relabels() >= 1);
    let selection = Selection { order: Some(Order::Username), ..Selection::default() };
    let (_, keys) = index.select(&selection, 0, 0);
    let mut sorted = names.clone();
    sorted.sort();
    let listed: Vec<String> = keys.iter().map(|key| index.get(key).map(|row| row.username).unwrap_or_default()).collect();
    assert_eq!(listed, sorted);
}

#[test]
fn removed_values_leave_the_arena_and_searches_stay_exact() {
    let mut index = ListingIndex::new(Fold::Ascii);
    let row = |n: u32| IndexedRow {
        key: key(4, u128::from(n)),
        range_id: "r".into(),
        device_id: format!("d{n}"),
        username: format!("User{n:03}"),
        platform: "linux".into(),
        client_hostname: format!("host-{n:03}.example"),
        last_updated: 0,
    };
    for n in 0..100u32 {
        index.upsert(row(n));
    }
    let full = index.hostnames.arena.len();
    for n in 0..90u32 {
        index.remove(&key(4, u128::from(n)));
    }
    assert!(index.hostnames.arena.len() < full / 2, "arena {} of {full}", index.hostnames.arena.len());
    // slots freed and reused: a search finds the new values and no removed one
    for n in 200..205 {
        index.upsert(row(n));
    }
    let selection = Selection { client_hostname: Some("HOST-00".into()), order: Some(Order::ClientHostname), ..Selection::default() };
    assert_eq!(index.select(&selection, 0, 0), (0, Vec::new()));
    let selection = Selection {
        client_hostname: Some("host-".into()),
        username: Some("user2".into()),
        order: Some(Order::Username),
        descending: true,
        ..Selection::default()
    };
    let (total, keys) = index.select(&selection, 0, 0);
    assert_eq!(total, 5);
    assert_eq!(keys, (200..205u128).rev().map(|n| key(4, n)).collect::<Vec<_>>());
    // a needle with a NUL is tested value by value (it cannot span two values)
    let selection = Selection { client_hostname: Some("example\u{0}host".into()), ..Selection::default() };
    assert_eq!(index.select(&selection, 0, 0).0, 0);
}

#[test]
fn kept_search_answers_follow_values_added_and_removed() {
    let mut index = ListingIndex::new(Fold::Ascii);
    let row = |n: u32, host: &str| IndexedRow {
        key: key(4, u128::from(n)),
        range_id: "r".into(),
        device_id: format!("d{n}"),
        username: "u".into(),
        platform: "linux".into(),
        client_hostname: host.into(),
        last_updated: 0,
    };
    for n in 0..50u32 {
        index.upsert(row(n, &format!("alpha-{n:02}")));
    }
    let alpha = Selection { client_hostname: Some("ALPHA-1".into()), ..Selection::default() };
    let beta = Selection { client_hostname: Some("beta".into()), ..Selection::default() };
    assert_eq!(index.select(&alpha, 0, 0).0, 10);
    assert_eq!(index.select(&beta, 0, 0).0, 0);
    assert_eq!(index.dictionaries()[2].searches_kept(), 2, "both answers kept");
    // values added, renamed and removed after the answers were kept
    index.upsert(row(60, "Alpha-1-new"));
    index.upsert(row(61, "beta-1"));
    index.upsert(row(10, "beta-2")); // was alpha-10
    index.remove(&key(4, 11)); // alpha-11
    assert_eq!(index.select(&alpha, 0, 0), (9, [12, 13, 14, 15, 16, 17, 18, 19, 60].iter().map(|&n| key(4, n)).collect()));
    assert_eq!(index.select(&beta, 0, 0), (2, vec![key(4, 10), key(4, 61)]));
    // a freed slot reused by a value that does not match leaves the answer
    index.remove(&key(4, 61));
    index.upsert(row(62, "gamma"));
    assert_eq!(index.select(&beta, 0, 0), (1, vec![key(4, 10)]));
    // at most SEARCHES_KEPT answers: the least recently used cheap one goes, the costly
    // (dense) ones stay
    let dense = Selection { client_hostname: Some("a".into()), ..Selection::default() };
    index.select(&dense, 0, 1);
    for n in 0..100 {
        let selection = Selection { client_hostname: Some(format!("x{n}")), ..Selection::default() };
        index.select(&selection, 0, 1);
    }
    assert_eq!(index.dictionaries()[2].searches_kept(), 64);
    let kept = |index: &ListingIndex, needle: &str| index.hostnames.searches.get(needle).is_some();
    assert!(kept(&index, "a") && kept(&index, "alpha-1"), "the dense answers were evicted");
    assert!(kept(&index, "x99") && !kept(&index, "x0"), "the cheap answers are not the most recent");
    // a removed value leaves the answer's count: with one value left, which does not
    // match, a stale count would read "every value matches" and drop the filter
    let mut small = ListingIndex::new(Fold::Ascii);
    small.upsert(row(1, "beta-1"));
    small.upsert(row(2, "gamma"));
    assert_eq!(small.select(&beta, 0, 0), (1, vec![key(4, 1)]));
    small.remove(&key(4, 1));
    assert_eq!(small.select(&beta, 0, 0), (0, Vec::new()));
}

#[test]
fn exports_hold_and_give_back_only_full_scratch_buffers() {
    let mut draw = Draw(11);
    let mut index = ListingIndex::new(Fold::Ascii);
    for n in 0..400 {
        index.upsert(row(&mut draw, n));
    }
    index.warm(2);
    let pool = |index: &ListingIndex| index.scratch.lock().map(|pool| pool.iter().map(Vec::capacity).collect::<Vec<_>>()).unwrap_or_default();
    let nothing = Selection { username: Some("nobody".into()), ..Selection::default() };
    let few = Selection { client_hostname: Some("h1-lt".into()), ip: Some((key(4, 0x6440_0000), key(4, 0x6440_0040))), ..Selection::default() };
    let all = Selection::default();
    // an export of few rows holds no scratch buffer while it is open
    let held = index.order_all(&few);
    assert!(held.len() < index.len() / 4);
    assert_eq!(pool(&index).len(), 2, "an open export of few rows holds a scratch buffer");
    drop(held);
    for selection in [&nothing, &few, &all] {
        drop(index.order_all(selection));
    }
    let capacities = pool(&index);
    assert!(!capacities.is_empty() && capacities.iter().all(|&capacity| capacity >= index.len()), "small buffers in the pool: {capacities:?}");
}
