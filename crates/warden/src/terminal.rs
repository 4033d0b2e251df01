//! Text on the operator's terminal. Much of what the CLI prints was written by someone
//! else: agents name tools, send rationales and forge token subjects; operators name
//! owners and reasons. A control or format character in any of them could move the
//! cursor, recolour or erase lines, and draw rows that were never recorded (an escape
//! sequence in a tool name once drew a forged `permit` row in `warden audit tail`).
//! So every stored string the CLI prints goes through [`escaped`].

use std::borrow::Cow;
use std::fmt::Write;

use warden_core::tool::is_unprintable;

/// `s` with every character that acts on a terminal instead of being shown (see
/// [`is_unprintable`]) written as `\u{..}`, so it is visible and inert.
pub fn escaped(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unprintable) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if is_unprintable(c) {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_and_bidi_overrides_are_written_out() {
        assert!(matches!(escaped("get_claim"), Cow::Borrowed("get_claim")));
        assert_eq!(
            escaped("a\u{1b}[2K\r\nb\u{202E}c\u{7}"),
            "a\\u{1b}[2K\\u{d}\\u{a}b\\u{202e}c\\u{7}"
        );
        assert_eq!(escaped("réclamation 查询"), "réclamation 查询");
    }
}
