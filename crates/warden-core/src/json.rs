//! JSON as Warden accepts it from callers: like `serde_json::from_slice`, except that an
//! object with the same key twice, at any depth, is refused.
//!
//! serde_json keeps the last of duplicate keys when it builds a `Value` and has no
//! option to refuse them. A policy then judges one reading of a body while a tool that
//! keeps the first occurrence acts on another (`"payout": 50000, "payout": 5` was
//! permitted as 5). The check is a `Value` visitor of a few dozen lines rather than a
//! dependency: the crates that offer it are little used, and the visitor runs inside
//! serde_json's own parser, so its recursion limit and error positions still apply.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Parses bytes into a `Value`, refusing duplicate object keys anywhere.
pub fn from_slice_strict(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = StrictValue.deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// Parses bytes into `T`, refusing duplicate object keys anywhere.
pub fn parse_strict<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    T::deserialize(from_slice_strict(bytes)?)
}

/// A `Value` seed whose maps refuse a key they have already seen.
#[derive(Clone, Copy)]
pub struct StrictValue;

impl<'de> DeserializeSeed<'de> for StrictValue {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for StrictValue {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(v) = seq.next_element_seed(StrictValue)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(A::Error::custom(format_args!(
                    "duplicate key `{}`",
                    key.escape_debug()
                )));
            }
            let v = map.next_value_seed(StrictValue)?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth() {
        for bad in [
            r#"{"a":1,"a":2}"#,
            r#"{"tool":"t","params":{"payout":50000,"payout":5}}"#,
            r#"[{"x":{"y":[{"k":1,"k":1}]}}]"#,
        ] {
            let e = from_slice_strict(bad.as_bytes()).unwrap_err();
            assert!(e.to_string().contains("duplicate key"), "{bad}: {e}");
        }
    }

    #[test]
    fn everything_else_parses_as_serde_json_does() {
        for ok in [
            r#"{"a":1,"b":[1,2.5,-3,"x",null,true,{}],"c":{"a":1}}"#,
            "18446744073709551615",
            "-9223372036854775808",
            r#""\u00e9\ud83d\ude00""#,
            "[]",
        ] {
            assert_eq!(
                from_slice_strict(ok.as_bytes()).unwrap(),
                serde_json::from_str::<Value>(ok).unwrap(),
                "{ok}"
            );
        }
        assert!(from_slice_strict(b"{} x").is_err());
        assert!(from_slice_strict(b"{").is_err());
        let deep = "[".repeat(200) + &"]".repeat(200);
        assert!(from_slice_strict(deep.as_bytes()).is_err());
        assert_eq!(
            parse_strict::<Value>(br#"{"k":"v"}"#).unwrap(),
            json!({"k": "v"})
        );
    }
}
