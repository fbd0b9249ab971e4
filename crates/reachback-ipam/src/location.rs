//! Client and range locations, and how well one matches the other.

/// A place: city, state and ISO 3166-1 alpha-2 country, with optional coordinates.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Location {
    pub city: Option<String>,
    pub state: Option<String>,
    pub country: Option<String>,
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
}

/// How well a range's location fits a client's; lower is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LocationTier {
    City,
    State,
    Country,
    Global,
    Fallback,
}

fn folded(value: &Option<String>) -> String {
    value.as_deref().unwrap_or("").trim().to_lowercase()
}

impl Location {
    /// The country, state and city folded for comparison.
    pub fn keys(&self) -> (String, String, String) {
        (folded(&self.country), folded(&self.state), folded(&self.city))
    }

    pub fn is_empty(&self) -> bool {
        self.keys() == (String::new(), String::new(), String::new())
    }

    pub fn coordinates(&self) -> Option<(f64, f64)> {
        Some((self.latitude?, self.longitude?))
    }

    /// The tier a range at `range_location` has for a client at `self`.
    pub fn tier_of(client: Option<&Location>, range_location: Option<&Location>) -> LocationTier {
        let Some(range_location) = range_location.filter(|location| !location.is_empty()) else {
            return LocationTier::Global;
        };
        let Some(client) = client.filter(|location| !location.is_empty()) else {
            return LocationTier::Fallback;
        };
        let (client_country, client_state, client_city) = client.keys();
        let (range_country, range_state, range_city) = range_location.keys();
        if client_country.is_empty() || client_country != range_country {
            return LocationTier::Fallback;
        }
        if !range_state.is_empty() && range_state == client_state {
            if !range_city.is_empty() && range_city == client_city {
                return LocationTier::City;
            }
            return LocationTier::State;
        }
        LocationTier::Country
    }
}

/// Great-circle distance in kilometres (haversine).
pub fn great_circle_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(country: &str, state: &str, city: &str) -> Location {
        let some = |value: &str| (!value.is_empty()).then(|| value.to_string());
        Location { country: some(country), state: some(state), city: some(city), ..Location::default() }
    }

    #[test]
    fn tiers() {
        let paris = at("FR", "Ile-de-France", "Paris");
        let cases = [
            (at("fr", "ile-de-france", "PARIS"), LocationTier::City),
            (at("FR", "Ile-de-France", "Versailles"), LocationTier::State),
            (at("FR", "Ile-de-France", ""), LocationTier::State),
            (at("FR", "Provence", "Marseille"), LocationTier::Country),
            (at("FR", "", ""), LocationTier::Country),
            (at("JP", "Tokyo", "Tokyo"), LocationTier::Fallback),
        ];
        for (range, tier) in cases {
            assert_eq!(Location::tier_of(Some(&paris), Some(&range)), tier, "{range:?}");
        }
        assert_eq!(Location::tier_of(Some(&paris), None), LocationTier::Global);
        assert_eq!(Location::tier_of(None, Some(&paris)), LocationTier::Fallback);
        assert_eq!(Location::tier_of(None, None), LocationTier::Global);
    }

    #[test]
    fn distances() {
        let paris = (48.8566, 2.3522);
        let london = (51.5074, -0.1278);
        let tokyo = (35.6762, 139.6503);
        let paris_london = great_circle_km(paris, london);
        assert!((330.0..360.0).contains(&paris_london), "{paris_london}");
        assert!(great_circle_km(paris, tokyo) > 9000.0);
    }
}
