//! Operators: the people who govern agents, their roles, and what each role may do.
//!
//! An operator account is a name, a role and a credential. The credential is a random
//! secret shown once when the account is made; the store keeps only its SHA-256 (the
//! secret has 256 bits of entropy, so a fast hash leaks nothing a slow one would
//! protect). A token names its account (`wdo1.<id>.<secret>`), so checking it is one
//! lookup by id and one comparison in constant time.
//!
//! The bootstrap operator token that `warden init` writes is an admin without an
//! account; it can be disabled once an admin account exists.
//!
//! INVARIANT: a role reaches a route only if the route's [`Access`] lists it; the admin
//! API builds every route with its `Access` (see `warden-server`'s route table).

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::clock::Nanos;

/// What an operator account may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Manages agents, credentials, policies, operators and kill switches; reads the audit.
    Admin,
    /// Decides held calls and may stop agents (kill), but not revive them.
    Reviewer,
    /// Reads and verifies the audit trail, nothing else.
    Auditor,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Reviewer, Role::Auditor];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Reviewer => "reviewer",
            Role::Auditor => "auditor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("`{s}` is not a role; use admin, reviewer or auditor"))
    }
}

/// What an admin route requires: the set of roles that may use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// Admin only: agents, credentials, policy, operators, reviving.
    Admin,
    /// Stopping agents and seeing what is stopped: admin and reviewer.
    Stop,
    /// Reading and verifying the audit: admin and auditor.
    Audit,
}

impl Access {
    /// The roles this access admits.
    pub fn roles(self) -> &'static [Role] {
        match self {
            Access::Admin => &[Role::Admin],
            Access::Stop => &[Role::Admin, Role::Reviewer],
            Access::Audit => &[Role::Admin, Role::Auditor],
        }
    }

    pub fn admits(self, role: Role) -> bool {
        self.roles().contains(&role)
    }

    /// The roles as a reader would say them: `admin`, `admin or reviewer`.
    pub fn describe(self) -> String {
        let names: Vec<&str> = self.roles().iter().map(|r| r.as_str()).collect();
        names.join(" or ")
    }
}

/// An operator account as the store keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    /// Random, 8 hex digits; part of the token and of the audit name.
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Lowercase hex SHA-256 of the secret.
    pub secret_hash: String,
    pub created_at_ns: Nanos,
    /// `None`: the credential does not expire.
    pub expires_at_ns: Option<Nanos>,
    /// Set when the account is removed; a removed account is kept so the audit's names
    /// stay resolvable, but its credential is refused.
    pub removed_at_ns: Option<Nanos>,
}

impl Operator {
    /// How audit entries and kill switches name this operator: `operator:NAME/ID`.
    pub fn who(&self) -> String {
        format!("operator:{}/{}", self.name, self.id)
    }

    /// Whether the credential may act at `now`, or why not.
    pub fn standing(&self, now: Nanos) -> Result<(), String> {
        if self.removed_at_ns.is_some() {
            return Err(format!(
                "operator `{}` was removed; its credential no longer works",
                self.name
            ));
        }
        match self.expires_at_ns {
            Some(exp) if exp <= now => Err(format!(
                "the credential of operator `{}` has expired; an admin can issue a new account",
                self.name
            )),
            _ => Ok(()),
        }
    }

    /// Whether `secret` is this account's secret, compared in constant time.
    pub fn secret_matches(&self, secret: &str) -> bool {
        ct_eq(hash_secret(secret).as_bytes(), self.secret_hash.as_bytes())
    }
}

/// A new account and its token (the only time the secret exists outside the holder's
/// hands). `id` (8 hex digits) and `secret` come from the caller's randomness.
pub fn new_account(
    name: &str,
    role: Role,
    id: String,
    secret: &str,
    now: Nanos,
    lifetime_ns: Option<Nanos>,
) -> Result<(Operator, String), String> {
    validate_name(name)?;
    validate_id(&id)?;
    if !is_secret(secret) {
        return Err("an operator secret is 64 lowercase hex digits (32 random bytes)".into());
    }
    let token = format_token(&id, secret);
    let op = Operator {
        id,
        name: name.to_owned(),
        role,
        secret_hash: hash_secret(secret),
        created_at_ns: now,
        expires_at_ns: lifetime_ns.map(|l| now.saturating_add(l)),
        removed_at_ns: None,
    };
    Ok((op, token))
}

/// The prefix that marks an operator account's token.
pub const TOKEN_PREFIX: &str = "wdo1";

/// The token for account `id` with `secret`.
pub fn format_token(id: &str, secret: &str) -> String {
    format!("{TOKEN_PREFIX}.{id}.{secret}")
}

/// The account id and secret of a token, if it has an account token's shape.
pub fn parse_token(token: &str) -> Option<(&str, &str)> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(TOKEN_PREFIX), Some(id), Some(secret), None)
            // Only what `new_account` can issue: anything else is refused before the
            // store is read, so a peer without a credential cannot make the gate read it.
            if validate_id(id).is_ok() && is_secret(secret) =>
        {
            Some((id, secret))
        }
        _ => None,
    }
}

/// The shape of an operator secret: 64 lowercase hex digits.
fn is_secret(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Lowercase hex SHA-256 of a secret: what the store keeps.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// An account id is 8 lowercase hex digits.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.len() == 8 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!(
            "`{id}` is not an operator id; ids are 8 lowercase hex digits"
        ))
    }
}

/// Operator names go into audit entries and terminals: keep them plain.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid operator name; use 1 to 64 letters, digits and - _ . @"
        ))
    }
}

/// Compares secrets in time independent of where they differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn op() -> Operator {
        Operator {
            id: "0a1b2c3d".into(),
            name: "alice".into(),
            role: Role::Reviewer,
            secret_hash: hash_secret("s3cret"),
            created_at_ns: 10,
            expires_at_ns: Some(100),
            removed_at_ns: None,
        }
    }

    #[test]
    fn each_access_admits_exactly_its_roles() {
        for (access, admitted) in [
            (Access::Admin, vec![Role::Admin]),
            (Access::Stop, vec![Role::Admin, Role::Reviewer]),
            (Access::Audit, vec![Role::Admin, Role::Auditor]),
        ] {
            for role in Role::ALL {
                assert_eq!(
                    access.admits(role),
                    admitted.contains(&role),
                    "{access:?} {role}"
                );
            }
        }
        assert_eq!(Access::Stop.describe(), "admin or reviewer");
    }

    #[test]
    fn roles_round_trip_and_unknown_ones_are_refused() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
        assert!("root"
            .parse::<Role>()
            .unwrap_err()
            .contains("admin, reviewer or auditor"));
        assert!("Admin".parse::<Role>().is_err());
    }

    #[test]
    fn tokens_parse_only_in_their_exact_shape() {
        let secret = "0f".repeat(32);
        let t = format_token("0a1b2c3d", &secret);
        assert_eq!(parse_token(&t), Some(("0a1b2c3d", secret.as_str())));
        let upper = format!("wdo1.0a1b2c3d.{}", "0F".repeat(32));
        let short = format!("wdo1.0a1b2c3d.{}", "0f".repeat(31));
        for bad in [
            upper.as_str(),
            short.as_str(),
            "wdo1.0a1b2c3d.abc",
            "wdo1.0a1b2c3d.",
            "wdo1.0A1B2C3D.abc",
            "wdo1.0a1b2c3.abc",
            "wdo2.0a1b2c3d.abc",
            "wdo1.0a1b2c3d.abc.def",
            "wop_0123456789abcdef",
            "",
        ] {
            assert_eq!(parse_token(bad), None, "{bad}");
        }
    }

    #[test]
    fn standing_refuses_removed_and_expired_accounts() {
        let o = op();
        assert!(o.standing(99).is_ok());
        assert!(o.standing(100).unwrap_err().contains("expired"));
        let removed = Operator {
            removed_at_ns: Some(50),
            ..op()
        };
        assert!(removed.standing(20).unwrap_err().contains("removed"));
        let forever = Operator {
            expires_at_ns: None,
            ..op()
        };
        assert!(forever.standing(u64::MAX).is_ok());
    }

    #[test]
    fn secrets_match_only_exactly() {
        let o = op();
        assert!(o.secret_matches("s3cret"));
        assert!(!o.secret_matches("s3cre"));
        assert!(!o.secret_matches("s3cret "));
        assert_eq!(o.who(), "operator:alice/0a1b2c3d");
    }

    #[test]
    fn a_new_account_holds_only_the_hash_and_its_token_opens_it() {
        let secret = "ab".repeat(32);
        let (o, token) = new_account(
            "bob",
            Role::Auditor,
            "00ff00ff".into(),
            &secret,
            5,
            Some(10),
        )
        .unwrap();
        assert_eq!(o.expires_at_ns, Some(15));
        assert!(!o.secret_hash.contains(&secret));
        let (id, s) = parse_token(&token).unwrap();
        assert_eq!(id, o.id);
        assert!(o.secret_matches(s));
        assert!(new_account("b b", Role::Admin, "00ff00ff".into(), &secret, 5, None).is_err());
        assert!(new_account("bob", Role::Admin, "00ff00ff".into(), "short", 5, None).is_err());
    }

    #[test]
    fn names_are_plain() {
        assert!(validate_name("alice.smith@corp").is_ok());
        for bad in ["", "a b", "x\u{1b}[2J", &"a".repeat(65), "a/b"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
