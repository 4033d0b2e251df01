//! JSON-RPC 2.0 framing and classification, as MCP uses it.

use serde_json::{json, Map, Value};

/// Standard JSON-RPC error codes.
pub const PARSE_ERROR: i64 = -32700;
pub const INVALID_REQUEST: i64 = -32600;
/// Implementation-defined server errors (-32000 to -32099).
pub const UPSTREAM_UNAVAILABLE: i64 = -32001;
pub const CALL_CANCELLED: i64 = -32002;
pub const CALL_TIMED_OUT: i64 = -32003;

/// What a message is, judged by its members (JSON-RPC 2.0 section 4 and 5).
#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Request {
        id: Value,
        method: String,
    },
    Notification {
        method: String,
    },
    /// A result or an error answering `id`.
    Response {
        id: Value,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(usize, usize),
    #[error("not valid JSON: {0}")]
    Parse(String),
    #[error("not a JSON-RPC 2.0 message: {0}")]
    Invalid(String),
}

impl FrameError {
    pub fn code(&self) -> i64 {
        match self {
            FrameError::Parse(_) => PARSE_ERROR,
            FrameError::TooLarge(..) | FrameError::Invalid(_) => INVALID_REQUEST,
        }
    }
}

/// Classifies one message object.
pub fn classify(v: &Value) -> Result<Kind, FrameError> {
    let obj = v
        .as_object()
        .ok_or_else(|| FrameError::Invalid("expected an object".into()))?;
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Err(FrameError::Invalid("`jsonrpc` must be \"2.0\"".into()));
    }
    let id = obj.get("id");
    if let Some(id) = id {
        if !(id.is_string() || id.is_number() || id.is_null()) {
            return Err(FrameError::Invalid(
                "`id` must be a string or a number".into(),
            ));
        }
    }
    match (obj.get("method"), id) {
        (Some(Value::String(m)), Some(id)) if !id.is_null() => Ok(Kind::Request {
            id: id.clone(),
            method: m.clone(),
        }),
        (Some(Value::String(m)), None) => Ok(Kind::Notification { method: m.clone() }),
        (Some(_), _) => Err(FrameError::Invalid(
            "`method` must be a string and `id` not null".into(),
        )),
        (None, Some(id)) if obj.contains_key("result") || obj.contains_key("error") => {
            Ok(Kind::Response { id: id.clone() })
        }
        (None, _) => Err(FrameError::Invalid(
            "neither a request, a notification nor a response".into(),
        )),
    }
}

/// Parses one frame (a line on stdio, a body over HTTP) into its messages: one object, or
/// the elements of a batch (allowed by protocol revision 2025-03-26).
pub fn parse_frame(bytes: &[u8], limit: usize) -> Result<(Value, bool), FrameError> {
    if bytes.len() > limit {
        return Err(FrameError::TooLarge(bytes.len(), limit));
    }
    // Duplicate keys are refused: the policy and the tool server must not read
    // different values out of one message.
    let v: Value = warden_core::json::from_slice_strict(bytes)
        .map_err(|e| FrameError::Parse(e.to_string()))?;
    match &v {
        Value::Array(items) if items.is_empty() => Err(FrameError::Invalid("empty batch".into())),
        Value::Array(_) => Ok((v, true)),
        Value::Object(_) => Ok((v, false)),
        _ => Err(FrameError::Invalid(
            "expected an object or a batch array".into(),
        )),
    }
}

/// The messages of a parsed frame, moved out: a batch's elements, or the one message.
pub fn into_messages(frame: Value) -> Vec<Value> {
    match frame {
        Value::Array(items) => items,
        one => vec![one],
    }
}

/// `params._meta` of a request, created if absent (for trace propagation).
pub fn meta_mut(msg: &mut Value) -> Option<&mut Map<String, Value>> {
    let params = msg
        .as_object_mut()?
        .entry("params")
        .or_insert_with(|| json!({}));
    let meta = params
        .as_object_mut()?
        .entry("_meta")
        .or_insert_with(|| json!({}));
    meta.as_object_mut()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        let r = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{}});
        assert_eq!(
            classify(&r),
            Ok(Kind::Request {
                id: json!(1),
                method: "tools/call".into()
            })
        );
        let n = json!({"jsonrpc":"2.0","method":"notifications/initialized"});
        assert_eq!(
            classify(&n),
            Ok(Kind::Notification {
                method: "notifications/initialized".into()
            })
        );
        let resp = json!({"jsonrpc":"2.0","id":"a","result":{}});
        assert_eq!(classify(&resp), Ok(Kind::Response { id: json!("a") }));
        let err = json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}});
        assert_eq!(classify(&err), Ok(Kind::Response { id: Value::Null }));
        for bad in [
            json!([]),
            json!({"id":1,"method":"x"}),
            json!({"jsonrpc":"2.0","id":{},"method":"x"}),
            json!({"jsonrpc":"2.0","method":5}),
            json!({"jsonrpc":"2.0","id":1}),
            json!({"jsonrpc":"2.0","id":null,"method":"x"}),
        ] {
            assert!(classify(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn frames() {
        assert!(matches!(parse_frame(b"{", 100), Err(FrameError::Parse(_))));
        assert!(matches!(
            parse_frame(&[b' '; 101], 100),
            Err(FrameError::TooLarge(101, 100))
        ));
        assert!(matches!(
            parse_frame(b"[]", 100),
            Err(FrameError::Invalid(_))
        ));
        assert!(matches!(
            parse_frame(b"3", 100),
            Err(FrameError::Invalid(_))
        ));
        assert!(parse_frame(b"[{}]", 100).unwrap().1);
        assert!(matches!(
            parse_frame(br#"{"params":{"arguments":{"a":1,"a":2}}}"#, 100),
            Err(FrameError::Parse(m)) if m.contains("duplicate key")
        ));
    }
}
