//! W3C trace context: the trace a call joins, carried into the audit entry and on to the
//! tool server, so the two logs can be joined.

/// Parses a `traceparent` value (`00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`)
/// into the trace id and the parent span id. Invalid values (wrong lengths, upper case,
/// all-zero ids, version `ff`, extra fields on version 00) give `None`, and the caller
/// starts a new trace.
pub fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let mut it = v.trim().split('-');
    let (ver, trace, parent, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
    let hex_of = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex_of(ver, 2)
        && ver != "ff"
        && hex_of(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex_of(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex_of(flags, 2)
        && (ver != "00" || it.next().is_none());
    ok.then(|| (trace.to_owned(), parent.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent() {
        let t = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(t),
            Some((
                "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                "00f067aa0ba902b7".into()
            ))
        );
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad}");
        }
    }
}
