//! Validation of values that come from outside: hostnames, domains, countries,
//! locations, platforms, names.

use reachback_ipam::Location;
use serde_json::Value;

use crate::error::FieldError;

pub const PLATFORMS: &[&str] = &["windows", "macos", "linux", "ios", "android"];

/// ISO 3166-1 alpha-2 codes (officially assigned).
const COUNTRIES: &str = "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ \
CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR \
GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP \
KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ \
NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW \
SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ \
UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW";

pub fn is_country(code: &str) -> bool {
    code.len() == 2 && COUNTRIES.split_ascii_whitespace().any(|known| known == code)
}

/// An RFC 1123 host name with at least two labels; returns it lowercased, without a trailing dot.
pub fn fqdn(text: &str) -> Result<String, String> {
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() || name.len() > 253 {
        return Err("must be a fully qualified domain name of 1 to 253 characters".into());
    }
    let labels: Vec<&str> = name.split('.').collect();
    if labels.len() < 2 {
        return Err("must be a fully qualified domain name (host.domain)".into());
    }
    for label in &labels {
        if label.is_empty() || label.len() > 63 {
            return Err("each label must have 1 to 63 characters".into());
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err("labels may hold only letters, digits and hyphens".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels may not begin or end with a hyphen".into());
        }
    }
    if labels.last().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err("the last label may not be all digits".into());
    }
    Ok(name.to_ascii_lowercase())
}

/// Whether `hostname` lies inside `domain` (strictly below it).
pub fn in_domain(hostname: &str, domain: &str) -> bool {
    hostname.len() > domain.len() + 1 && hostname.ends_with(domain) && hostname.as_bytes()[hostname.len() - domain.len() - 1] == b'.'
}

/// Whether a free-text value is acceptable: no control characters, bounded length.
pub fn plain_text(value: &str, max: usize) -> Result<(), String> {
    if value.chars().count() > max {
        return Err(format!("must have at most {max} characters"));
    }
    if value.chars().any(|c| c.is_control()) {
        return Err("may not contain control characters".into());
    }
    Ok(())
}

/// Whether a character is invisible (Unicode's default-ignorable code points:
/// zero-width spaces and joiners, soft hyphen, variation selectors, tags, …) or
/// a bidirectional control: either lets two names that render alike differ.
fn invisible_or_bidi(c: char) -> bool {
    matches!(
        c as u32,
        0x00AD | 0x034F | 0x061C | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180F | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F
            | 0x3164 | 0xFE00..=0xFE0F | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFF8 | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A | 0xE0000..=0xE0FFF
    )
}

/// A resource's name as it is stored: trimmed, in Unicode NFC (so `Café` typed
/// either way is one name), without control, invisible or bidirectional-control
/// characters, 1 to `max` characters. Names that merely look alike are refused
/// by the store (their confusable skeletons collide).
pub fn name(value: &str, max: usize) -> Result<String, String> {
    use unicode_normalization::UnicodeNormalization;
    let name: String = value.trim().nfc().collect();
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    plain_text(&name, max)?;
    if name.chars().any(invisible_or_bidi) {
        return Err("may not contain invisible or bidirectional-control characters (zero-width spaces, joiners, direction marks)".into());
    }
    Ok(name)
}

/// Parses a location object (or null) from JSON, collecting field errors.
pub fn location(value: &Value, field: &str, errors: &mut Vec<FieldError>) -> Option<Location> {
    let mut error = |name: &str, message: &str| errors.push(FieldError { field: format!("{field}.{name}"), message: message.into() });
    let object = match value {
        Value::Null => return None,
        Value::Object(object) => object,
        _ => {
            errors.push(FieldError { field: field.into(), message: "must be an object or null".into() });
            return None;
        }
    };
    let mut location = Location::default();
    for (key, value) in object {
        match key.as_str() {
            "city" | "state" | "country" => {
                let text = match value {
                    Value::Null => None,
                    Value::String(text) => Some(text.trim().to_string()).filter(|text| !text.is_empty()),
                    _ => {
                        error(key, "must be a string");
                        continue;
                    }
                };
                if let Some(text) = &text
                    && let Err(message) = plain_text(text, 128)
                {
                    error(key, &message);
                }
                match key.as_str() {
                    "city" => location.city = text,
                    "state" => location.state = text,
                    _ => location.country = text.map(|code| code.to_ascii_uppercase()),
                }
            }
            "latitude" | "longitude" => {
                let number = match value {
                    Value::Null => None,
                    Value::Number(number) => number.as_f64(),
                    _ => {
                        error(key, "must be a number");
                        continue;
                    }
                };
                let limit = if key == "latitude" { 90.0 } else { 180.0 };
                if number.is_some_and(|number| !(-limit..=limit).contains(&number)) {
                    error(key, &format!("must be between -{limit} and {limit}"));
                }
                if key == "latitude" { location.latitude = number } else { location.longitude = number }
            }
            _ => error(key, "is not a location field (city, state, country, latitude, longitude)"),
        }
    }
    if let Some(country) = &location.country {
        if !is_country(country) {
            error("country", "must be an ISO 3166-1 alpha-2 country code such as FR or US");
        }
    } else if location.city.is_some() || location.state.is_some() {
        error("country", "is required when a city or state is given");
    }
    if location.latitude.is_some() != location.longitude.is_some() {
        error("latitude", "latitude and longitude go together");
    }
    (location != Location::default()).then_some(location)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn countries_are_the_assigned_codes() {
        assert_eq!(COUNTRIES.split_ascii_whitespace().count(), 249);
        assert!(is_country("FR") && is_country("US") && is_country("JP"));
        assert!(!is_country("XX") && !is_country("fr") && !is_country("FRA") && !is_country("UK"));
    }

    #[test]
    fn hostnames() {
        let cases = [
            ("alice-laptop.corp.example", Ok("alice-laptop.corp.example")),
            ("Alice-Laptop.Corp.Example.", Ok("alice-laptop.corp.example")),
            ("laptop", Err("must be a fully qualified domain name (host.domain)")),
            ("-bad.corp.example", Err("labels may not begin or end with a hyphen")),
            ("bad_name.corp.example", Err("labels may hold only letters, digits and hyphens")),
            ("a..b", Err("each label must have 1 to 63 characters")),
            ("host.123", Err("the last label may not be all digits")),
            ("<script>.example", Err("labels may hold only letters, digits and hyphens")),
        ];
        for (input, expected) in cases {
            assert_eq!(fqdn(input).as_deref().map_err(String::as_str), expected, "{input}");
        }
        assert!(fqdn(&format!("{}.example", "a".repeat(64))).is_err());
        assert!(in_domain("a.corp.example", "corp.example"));
        assert!(!in_domain("acorp.example", "corp.example"));
        assert!(!in_domain("corp.example", "corp.example"));
    }
}
