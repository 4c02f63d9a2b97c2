//! Canonical JSON: object keys sorted by their UTF-8 bytes, no insignificant whitespace,
//! integers only (no floats). The same value always encodes to the same bytes, whatever map
//! type or field order produced it, so signatures and hashes never depend on iteration order.

use serde::Serialize;
use serde_json::Value;

/// Why a value has no canonical encoding.
#[derive(Debug, thiserror::Error)]
pub enum CanonicalError {
    /// The value did not serialize to JSON.
    #[error("value does not serialize to JSON: {0}")]
    Serialize(#[from] serde_json::Error),
    /// Floats have no canonical form here; use integers.
    #[error("floats are not allowed in signed JSON")]
    Float,
}

/// Encodes `value` canonically.
pub fn canonical_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CanonicalError> {
    let value = serde_json::to_value(value)?;
    let mut out = Vec::with_capacity(128);
    write_value(&value, &mut out)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match value {
        Value::Null | Value::Bool(_) | Value::String(_) => {
            serde_json::to_writer(&mut *out, value)?;
        }
        Value::Number(n) => {
            if n.is_f64() {
                return Err(CanonicalError::Float);
            }
            serde_json::to_writer(&mut *out, value)?;
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                serde_json::to_writer(&mut *out, key)?;
                out.push(b':');
                write_value(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sorts_keys_and_strips_whitespace() {
        let v = json!({"b": 1, "a": {"z": [1, 2, {"y": null, "x": "é"}], "c": true}});
        assert_eq!(
            String::from_utf8(canonical_json(&v).unwrap()).unwrap(),
            r#"{"a":{"c":true,"z":[1,2,{"x":"é","y":null}]},"b":1}"#
        );
    }

    #[test]
    fn rejects_floats() {
        assert!(matches!(canonical_json(&json!({"a": 1.5})), Err(CanonicalError::Float)));
    }
}
