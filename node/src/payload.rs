use std::fmt;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::NodeError;

/// A value as stored in an event: CBOR bytes.
///
/// Values written through the HTTP API are JSON converted to CBOR; embedding
/// applications may store any serde type.
#[derive(Clone, PartialEq, Eq)]
pub struct Payload(pub Vec<u8>);

impl Payload {
    /// Encodes a serde value as CBOR.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, NodeError> {
        let mut out = Vec::new();
        ciborium::into_writer(value, &mut out)
            .map_err(|e| NodeError::Invalid(format!("value cannot be encoded: {e}")))?;
        Ok(Payload(out))
    }

    /// Decodes the CBOR into a serde type.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, NodeError> {
        ciborium::from_reader(self.0.as_slice())
            .map_err(|e| NodeError::Invalid(format!("value does not decode as requested: {e}")))
    }

    /// The value as JSON. CBOR that has no JSON form (byte strings, non-string map keys)
    /// is shown as `{"$cbor": "<hex>"}` so a read never fails on a value some embedding
    /// application wrote.
    pub fn to_json(&self) -> serde_json::Value {
        match ciborium::from_reader::<serde_json::Value, _>(self.0.as_slice()) {
            Ok(v) => v,
            Err(_) => {
                let hex: String = self.0.iter().map(|b| format!("{b:02x}")).collect();
                serde_json::json!({ "$cbor": hex })
            }
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Payload({})", self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_through_cbor() {
        let v = serde_json::json!({"title": "milk", "done": false, "n": [1, 2.5, null]});
        assert_eq!(Payload::encode(&v).unwrap().to_json(), v);
    }

    #[test]
    fn non_json_cbor_is_shown_as_hex() {
        let p = Payload::encode(&serde_bytes::Bytes::new(&[1, 2])).unwrap();
        assert_eq!(p.to_json(), serde_json::json!({"$cbor": "420102"}));
    }
}
