//! Domain names as the table and the answerer compare them: lowercase ASCII,
//! labels joined by dots, no trailing dot. A label byte that is not a letter,
//! digit, hyphen or underscore is written `\ddd`, so any name off the wire has
//! one text and a label boundary is always a bare dot — and no hostname from the
//! table (letters, digits, hyphens) can equal a name with odd bytes.
//!
//! Case folding is ASCII only (RFC 4343): internationalised names travel and are
//! stored in their ASCII (punycode, `xn--`) form, which the server's hostname
//! validation also requires, so DNS and the broker's hostname patterns compare
//! the same strings.

/// The longest name on the wire (RFC 1035), in bytes of its wire form.
pub const MAX_NAME: usize = 255;
/// The longest label.
pub const MAX_LABEL: usize = 63;

/// The longest canonical text of a wire name (a byte escapes to at most four).
pub const CANONICAL_MAX: usize = 4 * MAX_NAME;

/// Writes the canonical text of wire labels into `out` (lowercase, odd bytes as
/// `\ddd`, labels joined by dots); returns its length. No allocation: the
/// answerer looks names up with it straight from the query.
pub fn canonical_into<'a>(labels: impl Iterator<Item = &'a [u8]>, out: &mut [u8; CANONICAL_MAX]) -> usize {
    let mut length = 0;
    for label in labels {
        if length > 0 && length < out.len() {
            out[length] = b'.';
            length += 1;
        }
        for &byte in label {
            let byte = byte.to_ascii_lowercase();
            if length + 4 > out.len() {
                break;
            }
            if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
                out[length] = byte;
                length += 1;
            } else {
                out[length] = b'\\';
                out[length + 1] = b'0' + byte / 100;
                out[length + 2] = b'0' + byte / 10 % 10;
                out[length + 3] = b'0' + byte % 10;
                length += 4;
            }
        }
    }
    length
}

/// The text `canonical_into` wrote (only ASCII is written).
pub fn canonical_str(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// Whether the canonical name `name` is `zone` or lies below it.
pub fn is_within(name: &str, zone: &str) -> bool {
    zone.is_empty() || name == zone || (name.len() > zone.len() && name.ends_with(zone) && name.as_bytes()[name.len() - zone.len() - 1] == b'.')
}

/// A domain name, canonical (see the module's documentation). Shared text: the
/// table holds each name once for both of its maps.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(std::sync::Arc<str>);

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Why a text is not a hostname.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("a label is empty or longer than 63 bytes")]
    Label,
    #[error("the name is longer than 253 characters")]
    TooLong,
    #[error("the name has a character that is not a letter, digit, hyphen or underscore")]
    Character,
}

impl Name {
    /// A hostname or zone from text (`Alice-Laptop.corp.example`, a trailing dot allowed).
    pub fn parse(text: &str) -> Result<Name, NameError> {
        let text = text.strip_suffix('.').unwrap_or(text);
        if text.is_empty() {
            return Err(NameError::Empty);
        }
        if text.len() > 253 {
            return Err(NameError::TooLong);
        }
        for label in text.split('.') {
            if label.is_empty() || label.len() > MAX_LABEL {
                return Err(NameError::Label);
            }
            if !label.bytes().all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_') {
                return Err(NameError::Character);
            }
        }
        Ok(Name(text.to_ascii_lowercase().into()))
    }

    /// A name from its wire labels (already split and bounded by the parser).
    pub fn from_labels<'a>(labels: impl Iterator<Item = &'a [u8]>) -> Name {
        let mut text = [0u8; CANONICAL_MAX];
        let length = canonical_into(labels, &mut text);
        Name(canonical_str(&text[..length]).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the root (no label).
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    pub fn label_count(&self) -> usize {
        if self.0.is_empty() { 0 } else { self.0.bytes().filter(|&byte| byte == b'.').count() + 1 }
    }

    /// The name without its first label; `None` for a single label or the root.
    pub fn parent(&self) -> Option<Name> {
        let (_, rest) = self.0.split_once('.')?;
        Some(Name(rest.into()))
    }

    /// Whether this is `zone` or a name below it.
    pub fn is_within(&self, zone: &Name) -> bool {
        is_within(&self.0, &zone.0)
    }

    /// The name's labels as text.
    pub fn labels(&self) -> impl Iterator<Item = &str> {
        self.0.split('.').filter(|label| !label.is_empty())
    }

    /// Appends the wire form (labels, then the root) to `out`. Only for names of the
    /// table (plain labels), which is every name the answerer writes besides echoes.
    pub fn write_wire(&self, out: &mut Vec<u8>) {
        for label in self.labels() {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fold_case_and_keep_label_boundaries() {
        let name = Name::parse("Alice-Laptop.CORP.example.").expect("name");
        assert_eq!(name.as_str(), "alice-laptop.corp.example");
        assert_eq!(name.label_count(), 3);
        let zone = Name::parse("corp.example").expect("zone");
        assert!(name.is_within(&zone));
        assert!(zone.is_within(&zone));
        assert!(!Name::parse("evilcorp.example").expect("name").is_within(&zone), "a suffix is not a zone");
        assert_eq!(name.parent(), Some(zone.clone()));
        let odd = Name::from_labels([&b"a.b"[..], b"CORP", b"example"].into_iter());
        assert_eq!(odd.as_str(), "a\\046b.corp.example", "a dot inside a label is not a boundary");
        assert!(odd.is_within(&zone));
        assert_eq!(odd.label_count(), 3);
        let mut wire = Vec::new();
        name.write_wire(&mut wire);
        assert_eq!(wire, b"\x0calice-laptop\x04corp\x07example\x00");
        assert_eq!(Name::parse("xn--caf-dma.corp.example").expect("punycode").as_str(), "xn--caf-dma.corp.example");
    }

    #[test]
    fn bad_hostnames_are_refused() {
        assert_eq!(Name::parse(""), Err(NameError::Empty));
        assert_eq!(Name::parse("a..b"), Err(NameError::Label));
        assert_eq!(Name::parse(&"a".repeat(64)), Err(NameError::Label));
        assert_eq!(Name::parse(&format!("{}.x", "a.".repeat(130))), Err(NameError::TooLong));
        assert_eq!(Name::parse("café.corp.example"), Err(NameError::Character), "IDNs are stored as punycode");
        assert_eq!(Name::parse("a b.example"), Err(NameError::Character));
    }
}
