//! Tool names as agents send them: the one check every edge (the decision API, both MCP
//! gateways) applies before a name is decided on and stored.
//!
//! A tool name ends up in the audit log and on operators' terminals, so it must be plain
//! printable text: a control character can redraw an operator's screen (an escape
//! sequence once drew a forged `permit` row in `warden audit tail`), and a format
//! character (a bidi override, a zero-width space) makes one name read as another.

/// The longest tool name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 256;

/// Why a tool name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("`tool` is empty")]
    Empty,
    #[error("`tool` is {0} bytes; at most {MAX_NAME_BYTES} are allowed")]
    TooLong(usize),
    #[error("`tool` contains U+{0:04X}, a control or formatting character")]
    Unprintable(u32),
}

/// Accepts a tool name that is 1 to [`MAX_NAME_BYTES`] bytes of printable text.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong(name.len()));
    }
    match name.chars().find(|c| is_unprintable(*c)) {
        Some(c) => Err(NameError::Unprintable(u32::from(c))),
        None => Ok(()),
    }
}

/// Whether `c` acts on the text around it instead of being shown: controls (Unicode
/// general category Cc, which includes ESC, CR and newline), format characters (Cf:
/// bidi embeddings, overrides and isolates, zero-width characters, the BOM, tags) and
/// the line and paragraph separators (Zl, Zp). Printers escape these; tool names may
/// not contain them.
pub fn is_unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{0600}'..='\u{0605}'
                | '\u{061C}'
                | '\u{06DD}'
                | '\u{070F}'
                | '\u{0890}'..='\u{0891}'
                | '\u{08E2}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{206F}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
                | '\u{110BD}'
                | '\u{110CD}'
                | '\u{13430}'..='\u{1343F}'
                | '\u{1BCA0}'..='\u{1BCA3}'
                | '\u{1D173}'..='\u{1D17A}'
                | '\u{E0001}'
                | '\u{E0020}'..='\u{E007F}'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_names_pass() {
        for n in [
            "get_claim",
            "fs/read_text_file",
            "files:read",
            "réclamation",
            "查询",
        ] {
            assert_eq!(check_name(n), Ok(()), "{n}");
        }
        assert_eq!(check_name(&"a".repeat(MAX_NAME_BYTES)), Ok(()));
    }

    #[test]
    fn empty_long_and_unprintable_names_are_refused() {
        assert_eq!(check_name(""), Err(NameError::Empty));
        assert_eq!(
            check_name(&"a".repeat(MAX_NAME_BYTES + 1)),
            Err(NameError::TooLong(MAX_NAME_BYTES + 1))
        );
        for (n, c) in [
            ("get_claim\u{1b}[2K", 0x1b),
            ("a\rb", 0x0d),
            ("a\nb", 0x0a),
            ("a\u{0}", 0),
            ("a\u{85}", 0x85),
            ("get_\u{202E}mialc", 0x202e),
            ("get\u{2066}claim", 0x2066),
            ("get\u{200B}claim", 0x200b),
            ("\u{FEFF}get_claim", 0xfeff),
            ("a\u{2028}b", 0x2028),
            ("a\u{E0041}", 0xe0041),
        ] {
            assert_eq!(check_name(n), Err(NameError::Unprintable(c)), "{n:?}");
        }
        let e = check_name("x\u{1b}").unwrap_err().to_string();
        assert_eq!(
            e,
            "`tool` contains U+001B, a control or formatting character"
        );
    }
}
