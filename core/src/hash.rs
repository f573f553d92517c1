//! Content hashing over a canonical JSON form: object keys sorted, no whitespace.
//! Two documents that mean the same hash the same, whatever order their keys came in.

use serde::Serialize;
use sha2::{Digest, Sha256};

/// Lower-case hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Whether `s` is a SHA-256 as this project writes it: 64 lower-case hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The canonical JSON text of a value: keys sorted (serde_json's default map is ordered),
/// compact separators.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
    // Round-trip through `Value` so that struct field order and map order do not matter.
    let v = serde_json::to_value(value)?;
    serde_json::to_string(&v)
}

/// SHA-256 over the canonical JSON form of a value.
pub fn canonical_sha256<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
    Ok(sha256_hex(canonical_json(value)?.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_does_not_change_the_hash() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":2,"x":[3,4]}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{ "a": {"x":[3,4], "y":2}, "b":1 }"#).unwrap();
        assert_eq!(
            canonical_json(&a).unwrap(),
            r#"{"a":{"x":[3,4],"y":2},"b":1}"#
        );
        assert_eq!(canonical_sha256(&a).unwrap(), canonical_sha256(&b).unwrap());
    }

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
