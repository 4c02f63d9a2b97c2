//! [`ClientFrame::from_json`]: a client frame parsed in two passes over its text, instead of
//! serde's internally tagged enum, which first copies the whole frame into an intermediate tree
//! (every string and number allocated again) and then reads the variant from that tree. Here the
//! first pass reads only the `type` member (skipping the others without allocating), the second
//! reads the variant's struct from the text, with the `type` member skipped.

use super::{AckFrame, ClientFrame, GroupAckFrame, PingFrame, ReadFrame, TypingFrame};
use crate::v1::messages::SendRequest;
use serde::de::value::{BorrowedStrDeserializer, StringDeserializer};
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;

impl ClientFrame {
    /// The frames' `type`s, in the order of the variants.
    pub const TYPES: &'static [&'static str] = &["send", "ack", "read", "typing", "ping", "group_ack", "group_read"];

    /// Parses a client frame from its JSON text: the same frames as its `Deserialize` (the
    /// same variants, fields and refusals: unknown fields, unknown types, a missing `type`),
    /// with less work. Tested against it.
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        #[derive(Deserialize)]
        struct Tag<'a> {
            #[serde(rename = "type", borrow)]
            kind: Cow<'a, str>,
        }
        let tag: Tag<'_> = serde_json::from_str(text)?;
        Ok(match tag.kind.as_ref() {
            "send" => Self::Send(untagged::<SendRequest>(text)?),
            "ack" => Self::Ack(untagged::<AckFrame>(text)?),
            "read" => Self::Read(untagged::<ReadFrame>(text)?),
            "typing" => Self::Typing(untagged::<TypingFrame>(text)?),
            "ping" => Self::Ping(untagged::<PingFrame>(text)?),
            "group_ack" => Self::GroupAck(untagged::<GroupAckFrame>(text)?),
            "group_read" => Self::GroupRead(untagged::<GroupAckFrame>(text)?),
            other => return Err(de::Error::unknown_variant(other, Self::TYPES)),
        })
    }
}

/// `T` from the object in `text`, its `type` member skipped.
fn untagged<'de, T: Deserialize<'de>>(text: &'de str) -> serde_json::Result<T> {
    let mut json = serde_json::Deserializer::from_str(text);
    let value = T::deserialize(WithoutType(&mut json))?;
    json.end()?;
    Ok(value)
}

/// A deserializer of a JSON object that hides its `type` member from what reads it.
struct WithoutType<D>(D);

impl<'de, D: Deserializer<'de>> Deserializer<'de> for WithoutType<D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(SkipTypeVisitor(visitor))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct SkipTypeVisitor<V>(V);

impl<'de, V: Visitor<'de>> Visitor<'de> for SkipTypeVisitor<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(SkipType(map))
    }
}

/// The members of a map but `type`.
struct SkipType<A>(A);

impl<'de, A: MapAccess<'de>> MapAccess<'de> for SkipType<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        loop {
            match self.0.next_key::<Key<'de>>()? {
                None => return Ok(None),
                Some(key) if key.as_str() == "type" => {
                    self.0.next_value::<IgnoredAny>()?;
                }
                Some(Key::Borrowed(key)) => return seed.deserialize(BorrowedStrDeserializer::new(key)).map(Some),
                Some(Key::Owned(key)) => return seed.deserialize(StringDeserializer::new(key)).map(Some),
            }
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.0.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

/// A member's name: borrowed from the text when it has no escapes.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(key) => key,
            Key::Owned(key) => key,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a member name")
            }

            fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(key))
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(key.to_owned()))
            }

            fn visit_string<E: de::Error>(self, key: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(key))
            }
        }
        deserializer.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each text parses to the same frame, or fails, both ways.
    #[test]
    fn frames_parse_as_the_derived_deserialize_parses_them() {
        let texts = [
            r#"{"type":"ack","seq":5}"#,
            r#"{"seq":5,"type":"ack","id":9}"#,
            r#"{"type":"ack","seq":5,"extra":1}"#,
            r#"{"type":"ack"}"#,
            r#"{"type":"ack","seq":-1}"#,
            r#"{"type":"ack","seq":5}  "#,
            r#"{"type":"ack","seq":5} x"#,
            r#"{"type":"ping","nonce":7}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"ping","nonce":"n1"}"#,
            r#"{"type":"typing","to":"@bob:b.test","typing":true}"#,
            r#"{"type":"typing","to":"bob","typing":true}"#,
            r#"{"type":"read","peer":"@bob:b.test","message_ids":[1,2,3],"id":4}"#,
            r#"{"type":"read","peer":"@bob:b.test"}"#,
            r#"{"type":"group_ack","group_id":"!g1:hub.test","group_seq":3}"#,
            r#"{"type":"group_read","group_id":"!g1:hub.test","group_seq":3,"id":2}"#,
            r#"{"type":"group_read","group_id":"g1","group_seq":3}"#,
            r#"{"type":"send","client_msg_id":"6f1d6f1a-3f0e-4c53-9f3b-4c0a0f4a2b11","to":"@bob:b.test","envelopes":[{"user":"@bob:b.test","device":"D1","ciphertext":"AAEC"}]}"#,
            r#"{"type":"send","client_msg_id":"6f1d6f1a-3f0e-4c53-9f3b-4c0a0f4a2b11","to":"@bob:b.test","envelopes":[],"media_once":true,"media":["x"]}"#,
            r#"{"type":"send","client_msg_id":"not a uuid","to":"@bob:b.test","envelopes":[]}"#,
            r#"{"type":"send","to":"@bob:b.test","envelopes":[]}"#,
            r#"{"type":"s\u0065nd","client_msg_id":"6f1d6f1a-3f0e-4c53-9f3b-4c0a0f4a2b11","to":"@bob:b.test","envelopes":[]}"#,
            r#"{"typ\u0065":"ack","s\u0065q":5}"#,
            r#"{"type":"ack","type":"ack","seq":5}"#,
            r#"{"type":"nope","seq":5}"#,
            r#"{"type":7,"seq":5}"#,
            r#"{"seq":5}"#,
            r#"[1,2]"#,
            r#""ack""#,
            r#"{"type":"ack","seq":5"#,
            "",
        ];
        let mut parsed = 0;
        for text in texts {
            let derived = serde_json::from_str::<ClientFrame>(text);
            let fast = ClientFrame::from_json(text);
            match (&derived, &fast) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{text}");
                    parsed += 1;
                }
                (Err(_), Err(_)) => {}
                _ => panic!("{text}: derived {derived:?}, from_json {fast:?}"),
            }
        }
        assert_eq!(parsed, 13, "the texts that parse");
    }

    /// A frame is an object; serde's derive also takes an array (the tag first), which no
    /// client sends.
    #[test]
    fn an_array_is_not_a_frame() {
        assert!(ClientFrame::from_json(r#"["ack",5]"#).is_err());
    }
}
