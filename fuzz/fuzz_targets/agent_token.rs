//! Agent tokens: `Verifier::verify` on hostile input.
//!
//! One key (`from_seed([7; 32])`) is trusted. Checked, for three kinds of input:
//! - `Raw`: arbitrary bytes (as lossy UTF-8) never verify, unless they are exactly the one
//!   valid token this target signs;
//! - `Mutate`: the valid token with byte edits applied verifies only if the edits left it
//!   byte for byte unchanged, and then with the original claims. Base64url decoding is
//!   canonical and Ed25519 signatures are not malleable, so no other text can carry a
//!   valid signature;
//! - `Sign`: arbitrary claims signed by the trusted key verify exactly when the model
//!   says (issuer, audience, size, validity window with `nbf`) and round-trip unchanged;
//!   signed by the retired key (`from_seed([9; 32])`, which a key rotation left verifying
//!   until `NOW_S`), the same, except that from `NOW_S` on they are expired; signed by
//!   another key, or by another key under the trusted key's id, they never verify.
//!
//! Every verification runs twice on a fresh verifier, so the cached path must agree with
//! the uncached one.

#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use warden_core::clock::NANOS_PER_SEC;
use warden_core::identity::{
    Claims, PublicKey, SigningKeyPair, Verifier, AGENT_AUDIENCE, MAX_TOKEN_BYTES,
};
use warden_core::Reason;

const ISSUER: &str = "warden";
const NOW_S: u64 = 1_700_000_000;
const NOW: u64 = NOW_S * NANOS_PER_SEC;
const LEEWAY_S: u64 = 60;

struct Fixture {
    key: SigningKeyPair,
    /// Rotated out: verifies until `NOW_S`.
    retired: SigningKeyPair,
    claims: Claims,
    token: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let key = SigningKeyPair::from_seed([7; 32]);
        let claims = Claims {
            iss: ISSUER.into(),
            sub: "claims-processor-v3".into(),
            aud: AGENT_AUDIENCE.into(),
            iat: NOW_S - 10,
            exp: NOW_S + 3600,
            nbf: None,
            jti: "j-1".into(),
            owner: "claims-team".into(),
            tier: 2,
            scopes: vec!["claims:read".into()],
        };
        let token = key.sign(&claims);
        let retired = SigningKeyPair::from_seed([9; 32]);
        Fixture {
            key,
            retired,
            claims,
            token,
        }
    })
}

/// Verifies on a fresh verifier, twice (the second time from its cache), and checks the
/// two answers agree.
fn verify(token: &str, now: u64) -> Result<Claims, Reason> {
    let f = fixture();
    let v = Verifier::with_keys(
        ISSUER,
        [
            PublicKey::current(f.key.verifying_key()),
            PublicKey {
                key: f.retired.verifying_key(),
                until: Some(NOW_S),
            },
        ],
        4,
    );
    let first = v
        .verify(token, now)
        .map(|c| (*c).clone())
        .map_err(|e| e.reason);
    let second = v
        .verify(token, now)
        .map(|c| (*c).clone())
        .map_err(|e| e.reason);
    assert_eq!(first, second, "cached verification disagrees for {token:?}");
    first
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Set {
        at: u16,
        byte: u8,
    },
    Insert {
        at: u16,
        byte: u8,
    },
    Remove {
        at: u16,
    },
    Truncate {
        len: u16,
    },
    /// Swaps two adjacent bytes (moves a `.` by one, keeping three parts).
    SwapAdjacent {
        at: u16,
    },
}

#[derive(Arbitrary, Debug)]
struct ArbClaims {
    iss_is_ours: bool,
    iss: String,
    sub: String,
    aud_is_ours: bool,
    aud: String,
    iat: u64,
    exp: u64,
    nbf: Option<u64>,
    /// Near now (so the validity window is exercised), else as given.
    times_near_now: bool,
    jti: String,
    owner: String,
    tier: u8,
    scopes: Vec<String>,
}

impl ArbClaims {
    fn claims(self) -> Claims {
        let (iat, exp, nbf) = if self.times_near_now {
            let near = |x: u64| NOW_S.wrapping_add(x % 8192).wrapping_sub(4096);
            (near(self.iat), near(self.exp), self.nbf.map(near))
        } else {
            (self.iat, self.exp, self.nbf)
        };
        Claims {
            iss: if self.iss_is_ours {
                ISSUER.into()
            } else {
                self.iss
            },
            sub: self.sub,
            aud: if self.aud_is_ours {
                AGENT_AUDIENCE.into()
            } else {
                self.aud
            },
            iat,
            exp,
            nbf,
            jti: self.jti,
            owner: self.owner,
            tier: self.tier,
            scopes: self.scopes,
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Input<'a> {
    Raw(&'a [u8]),
    Mutate(Vec<Edit>),
    Sign {
        claims: ArbClaims,
        /// Seconds from `NOW_S - 8192`, to land on either side of the window.
        now_offset: u16,
        /// `None`: the trusted key (or the retired one, with `retired`). `Some(seed)`:
        /// another key (seed forced to differ from both).
        other_seed: Option<[u8; 32]>,
        retired: bool,
    },
}

fn apply(token: &mut Vec<u8>, e: &Edit) {
    let n = token.len();
    match *e {
        Edit::Set { at, byte } if n > 0 => token[usize::from(at) % n] = byte,
        Edit::Insert { at, byte } => token.insert(usize::from(at) % (n + 1), byte),
        Edit::Remove { at } if n > 0 => {
            token.remove(usize::from(at) % n);
        }
        Edit::Truncate { len } => token.truncate(usize::from(len)),
        Edit::SwapAdjacent { at } if n > 1 => {
            token.swap(usize::from(at) % (n - 1), usize::from(at) % (n - 1) + 1)
        }
        _ => {}
    }
}

/// What `verify` must answer for a token signed by the trusted key, or by the retired
/// key when `retired`.
fn expected(token: &str, c: &Claims, now: u64, retired: bool) -> Result<Claims, Reason> {
    let now_s = now / NANOS_PER_SEC;
    if token.len() > MAX_TOKEN_BYTES {
        Err(Reason::CredentialMalformed)
    } else if c.iss != ISSUER || c.aud != AGENT_AUDIENCE {
        Err(Reason::CredentialInvalid)
    } else if (retired && now_s >= NOW_S)
        || now_s >= c.exp
        || c.iat > now_s.saturating_add(LEEWAY_S)
        || c.nbf.is_some_and(|nbf| now_s < nbf)
    {
        Err(Reason::CredentialExpired)
    } else {
        Ok(c.clone())
    }
}

fuzz_target!(|input: Input| {
    let f = fixture();
    match input {
        Input::Raw(bytes) => {
            let token = String::from_utf8_lossy(bytes);
            if let Ok(c) = verify(&token, NOW) {
                assert_eq!(
                    token, f.token,
                    "arbitrary bytes verified: {token:?} -> {c:?}"
                );
            }
        }
        Input::Mutate(edits) => {
            let mut bytes = f.token.clone().into_bytes();
            for e in &edits {
                apply(&mut bytes, e);
            }
            let token = String::from_utf8_lossy(&bytes);
            match verify(&token, NOW) {
                Ok(c) => {
                    assert_eq!(
                        token, f.token,
                        "an altered token verified: {token:?} -> {c:?}"
                    );
                    assert_eq!(c, f.claims);
                }
                Err(r) => assert_ne!(token, f.token, "the valid token was refused: {r:?}"),
            }
        }
        Input::Sign {
            claims,
            now_offset,
            other_seed,
            retired,
        } => {
            let c = claims.claims();
            let now = (NOW_S - 8192 + u64::from(now_offset)) * NANOS_PER_SEC;
            match other_seed {
                None => {
                    let key = if retired { &f.retired } else { &f.key };
                    let token = key.sign(&c);
                    assert_eq!(
                        verify(&token, now),
                        expected(&token, &c, now, retired),
                        "{token}"
                    );
                }
                Some(mut seed) => {
                    while seed == [7; 32] || seed == [9; 32] {
                        seed[0] ^= 1;
                    }
                    let other = SigningKeyPair::from_seed(seed);
                    let token = other.sign(&c);
                    assert!(
                        verify(&token, now).is_err(),
                        "a foreign key's token verified"
                    );
                    // The same claims and signature under the trusted key's id.
                    let header = B64.encode(format!(
                        r#"{{"alg":"EdDSA","kid":"{}","typ":"JWT"}}"#,
                        f.key.kid()
                    ));
                    let rest = token.split_once('.').map_or("", |(_, rest)| rest);
                    let forged = format!("{header}.{rest}");
                    assert!(
                        verify(&forged, now).is_err(),
                        "a foreign signature verified under our kid: {forged}"
                    );
                }
            }
        }
    }
});
