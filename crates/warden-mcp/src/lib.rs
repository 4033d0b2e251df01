//! MCP for Warden: the JSON-RPC message model, the decisions a gateway asks of Warden,
//! and the governed stdio proxy.
//!
//! A governance proxy must forward what it does not understand exactly as it came, so
//! messages are kept as `serde_json::Value` and only classified (request, notification,
//! response) and, for `tools/call`, inspected. That is also why this is written against
//! the wire format rather than an SDK's typed messages: an SDK re-serializes and drops
//! fields and protocol revisions it does not know.
//!
//! The decision itself comes from a [`gate::Gate`]: Warden's pipeline in-process, or a
//! running `warden serve` over HTTP. Nothing here knows which.

pub mod engine;
pub mod gate;
pub mod message;
pub mod sniff;
pub mod sse;
pub mod stdio;
pub mod tools;
