//! Borrowed JSON objects: a message's top-level keys with their values left as raw JSON text.
//!
//! Ingest reads a few fields of each message and passes `properties` and `context` on as
//! text; building a `serde_json::Value` tree for that (a `String` per key and value, a map
//! node per object) and serialising it again was the largest cost of the ingest path.
//! [`RawObject`] reads one level without allocating for keys or values, and [`minify`]
//! copies an object's text without its insignificant whitespace.

use std::borrow::Cow;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// An object's top-level entries, in the order they were written, values as raw JSON.
#[derive(Debug, Default)]
pub(crate) struct RawObject<'a> {
    entries: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> RawObject<'a> {
    /// Reads `text`, which must be one JSON object.
    pub(crate) fn parse(text: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The raw value of `key` (the last one written, as `serde_json` keeps it).
    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// The value of `key`, parsed.
    pub(crate) fn value(&self, key: &str) -> Option<Value> {
        self.get(key)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// The keys, in the order written.
    pub(crate) fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(k, _)| k.as_ref())
    }

    /// Whether the object has no entries.
    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The whole object as a `Value` (the last of a repeated key wins, as in `serde_json`).
    pub(crate) fn to_value(&self) -> Value {
        let mut map = serde_json::Map::new();
        for (key, raw) in &self.entries {
            if let Ok(value) = serde_json::from_str(raw.get()) {
                map.insert(key.to_string(), value);
            }
        }
        Value::Object(map)
    }
}

/// A JSON object, parsed or raw: what a reader of a few fields needs.
pub trait JsonObject {
    /// The value of `key`.
    fn field(&self, key: &str) -> Option<Cow<'_, Value>>;
    /// The keys.
    fn field_names(&self) -> Vec<&str>;
    /// The whole object.
    fn to_value(&self) -> Value;
}

impl JsonObject for Map<String, Value> {
    fn field(&self, key: &str) -> Option<Cow<'_, Value>> {
        self.get(key).map(Cow::Borrowed)
    }

    fn field_names(&self) -> Vec<&str> {
        self.keys().map(String::as_str).collect()
    }

    fn to_value(&self) -> Value {
        Value::Object(self.clone())
    }
}

impl JsonObject for RawObject<'_> {
    fn field(&self, key: &str) -> Option<Cow<'_, Value>> {
        self.value(key).map(Cow::Owned)
    }

    fn field_names(&self) -> Vec<&str> {
        self.keys().collect()
    }

    fn to_value(&self) -> Value {
        RawObject::to_value(self)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for Entries<'a> {
            type Value = RawObject<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(Key(key)) = map.next_key()? {
                    let value: &'de RawValue = map.next_value()?;
                    entries.push((key, value));
                }
                Ok(RawObject { entries })
            }
        }
        deserializer.deserialize_map(Entries(std::marker::PhantomData))
    }
}

/// A key, borrowed from the text unless it had escapes to undo.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for KeyVisitor<'a> {
            type Value = Key<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        deserializer.deserialize_str(KeyVisitor(std::marker::PhantomData))
    }
}

/// Whether `text` reads as `serde_json` reads a `Value` (strings and numbers included) and
/// no object in it, at any depth, writes a key twice: then its text and its `Value` say the
/// same to every reader. One pass, no allocation but for escaped keys.
pub(crate) fn is_plain(text: &str) -> bool {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    Plain::deserialize(&mut deserializer).is_ok() && deserializer.end().is_ok()
}

/// Any JSON value, checked for repeated keys on the way through.
struct Plain;

impl<'de> Deserialize<'de> for Plain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PlainVisitor)
    }
}

struct PlainVisitor;

impl<'de> Visitor<'de> for PlainVisitor {
    type Value = Plain;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Plain, E> {
        Ok(Plain)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Plain, E> {
        Ok(Plain)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Plain, E> {
        Ok(Plain)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Plain, E> {
        Ok(Plain)
    }

    fn visit_str<E>(self, _: &str) -> Result<Plain, E> {
        Ok(Plain)
    }

    fn visit_unit<E>(self) -> Result<Plain, E> {
        Ok(Plain)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Plain, A::Error> {
        while seq.next_element::<Plain>()?.is_some() {}
        Ok(Plain)
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Plain, M::Error> {
        let mut keys: Vec<Cow<'de, str>> = Vec::new();
        while let Some(Key(key)) = map.next_key()? {
            if keys.contains(&key) {
                return Err(serde::de::Error::custom("repeated key"));
            }
            keys.push(key);
            map.next_value::<Plain>()?;
        }
        Ok(Plain)
    }
}

/// Whether `raw` is a JSON object (as opposed to any other JSON value).
pub(crate) fn is_object(raw: &RawValue) -> bool {
    raw.get().trim_start().starts_with('{')
}

/// Whether `raw` is JSON `null`.
pub fn is_null(raw: &RawValue) -> bool {
    raw.get().trim() == "null"
}

/// Appends valid JSON `text` to `out` without the whitespace between tokens (what
/// `serde_json` would write for the same value, but for key order and number spelling).
pub(crate) fn minify(text: &str, out: &mut Vec<u8>) {
    let bytes = text.as_bytes();
    let mut in_string = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if b == b'"' {
            in_string = true;
        } else if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            out.extend_from_slice(&bytes[start..i]);
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_level_and_borrows() {
        let text = r#"{"a": 1, "b\"q": {"c": [1, 2]}, "a": "two"}"#;
        let object = RawObject::parse(text).unwrap();
        assert_eq!(object.keys().count(), 3);
        assert_eq!(
            object.get("a").unwrap().get(),
            r#""two""#,
            "the last one wins"
        );
        assert_eq!(object.get("b\"q").unwrap().get(), r#"{"c": [1, 2]}"#);
        assert_eq!(
            object.to_value(),
            serde_json::from_str::<Value>(text).unwrap()
        );
        assert!(matches!(object.entries[0].0, Cow::Borrowed(_)));
        assert!(RawObject::parse("[1]").is_err());
    }

    #[test]
    fn minify_keeps_strings_whole() {
        let text = "{ \"a b\" : [ 1 ,\n\t2 ], \"s\": \"x \\\" y\\\\\", \"e\": \"\\\\\" }";
        let mut out = Vec::new();
        minify(text, &mut out);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out, r#"{"a b":[1,2],"s":"x \" y\\","e":"\\"}"#);
        assert_eq!(
            serde_json::from_str::<Value>(&out).unwrap(),
            serde_json::from_str::<Value>(text).unwrap()
        );
    }

    #[test]
    fn plain_is_what_a_value_reads_without_repeats() {
        let plain = |t: &str| {
            let verdict = is_plain(t);
            if verdict {
                assert!(serde_json::from_str::<Value>(t).is_ok(), "{t}");
            }
            verdict
        };
        assert!(plain(
            r#"{"a": [1, -2.5e3, "x\u00e9", {"b": null, "c": true}], "d": {}}"#
        ));
        assert!(!plain(r#"{"a": {"b": 1, "b": 2}}"#), "a nested repeat");
        assert!(!plain(r#"{"a": [{"b": 1, "b\u0000": 2, "b": 3}]}"#));
        assert!(!plain(r#"{"s": "\ud800"}"#), "a lone surrogate");
        assert!(!plain(r#"{"n": 1e400}"#), "out of range");
        assert!(!plain(r#"{"a": 1} x"#), "trailing text");
        assert!(
            !plain(&format!("{}{}", "[".repeat(200), "]".repeat(200))),
            "too deep"
        );
    }

    #[test]
    fn objects_and_nulls() {
        fn raw(t: &str) -> &RawValue {
            serde_json::from_str(t).unwrap()
        }
        assert!(is_object(raw(" {}")));
        assert!(!is_object(raw("[]")));
        assert!(is_null(raw("null")));
        assert!(!is_null(raw("\"null\"")));
    }
}

/// Decimals written as JSON numbers with their exact digits (`999999999999.3000000001`, not
/// the nearest binary float), for `#[serde(serialize_with = …)]`: SQL's JSON answers decimals
/// the same way. Only a `serde_json` writer keeps the digits; a value turned into a
/// `serde_json::Value` first goes through a float again.
pub mod exact {
    use rust_decimal::Decimal;
    use serde::ser::Error;
    use serde::{Serialize, Serializer};
    use serde_json::value::RawValue;

    /// A decimal as an exact JSON number.
    pub fn decimal<S: Serializer>(value: &Decimal, serializer: S) -> Result<S::Ok, S::Error> {
        RawValue::from_string(value.normalize().to_string())
            .map_err(S::Error::custom)?
            .serialize(serializer)
    }

    /// An optional decimal as an exact JSON number, or `null`.
    pub fn optional<S: Serializer>(
        value: &Option<Decimal>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => decimal(value, serializer),
            None => serializer.serialize_none(),
        }
    }
}
