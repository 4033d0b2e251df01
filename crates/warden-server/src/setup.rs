//! Files a node needs besides its config: the signing key, its public half and the
//! operator token.
//!
//! The signing key and the operator token are the governance secrets: whoever reads the
//! key can mint a token for any agent, whoever reads the operator token can clear kill
//! switches. So they are written readable by their owner only, and a copy that group or
//! others may read is refused rather than used. The public key file beside the key lets
//! a process that only checks tokens (the embedded `warden mcp-proxy`) do so without
//! ever opening the private key.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use warden_core::clock::{Clock, Nanos, SystemClock, NANOS_PER_SEC};
use warden_core::config::Settings;
use warden_core::identity::{
    public_keys_from_file, public_keys_to_file, PublicKey, SigningKeyPair,
};

use crate::ids::random_hex;

/// The shortest operator token accepted, however it is given: 128 bits as hex.
pub const MIN_OPERATOR_TOKEN_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(
        "no operator token: set WARDEN_OPERATOR_TOKEN or write one to {0} (`warden init` does)"
    )]
    NoOperatorToken(String),
    #[error(
        "the operator token from {0} is shorter than {MIN_OPERATOR_TOKEN_LEN} characters; \
         use a long random secret (e.g. `openssl rand -hex 32`)"
    )]
    ShortOperatorToken(String),
    #[error(
        "`{0}` holds a secret but group or others may read or change it; \
         run `chmod 600 {0}`"
    )]
    Exposed(String),
    #[error(
        "no signing key at `{0}`: `warden init` writes one, and `warden serve` creates one \
         on its first start"
    )]
    NoKey(String),
    #[error(
        "no public key at `{0}`: `warden serve` and `warden init` write it beside the \
         signing key; copy it from the governance host (it is not secret)"
    )]
    NoPublicKey(String),
    #[error("cannot get randomness from the OS: {0}")]
    Random(String),
}

fn file_err(path: &Path, message: impl Into<String>) -> SetupError {
    SetupError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Writes a secret file readable only by its owner; refuses to overwrite.
pub fn write_secret(path: &Path, contents: &str) -> Result<(), SetupError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| file_err(path, format!("cannot create: {e}")))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| file_err(path, format!("cannot write: {e}")))
}

/// Reads a secret file, or `None` if it does not exist. A file that group or others may
/// read or write is refused: the secret may already have leaked, and using it would
/// hide that.
pub fn read_secret(path: &Path) -> Result<Option<String>, SetupError> {
    read_guarded(path, 0o077, || {
        SetupError::Exposed(path.display().to_string())
    })
}

/// Reads `path` unless the mode of the file actually opened (not of whatever the path
/// names a moment later) has any of `forbidden` set; a missing file is `None`.
fn read_guarded(
    path: &Path,
    forbidden: u32,
    refused: impl FnOnce() -> SetupError,
) -> Result<Option<String>, SetupError> {
    let mut f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(file_err(path, format!("cannot read: {e}"))),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = f
            .metadata()
            .map_err(|e| file_err(path, format!("cannot read: {e}")))?;
        if meta.permissions().mode() & forbidden != 0 {
            return Err(refused());
        }
    }
    #[cfg(not(unix))]
    let _ = (forbidden, refused);
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| file_err(path, format!("cannot read: {e}")))?;
    Ok(Some(text))
}

pub fn generate_key() -> Result<SigningKeyPair, SetupError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| SetupError::Random(e.to_string()))?;
    Ok(SigningKeyPair::from_seed(seed))
}

/// Where the public half of the key at `key_file` is kept: `warden.key` → `warden.pub`.
pub fn public_key_path(key_file: &Path) -> PathBuf {
    let p = key_file.with_extension("pub");
    if p == key_file {
        let mut s = key_file.as_os_str().to_owned();
        s.push(".pub");
        PathBuf::from(s)
    } else {
        p
    }
}

/// Loads the signing key; a missing file is an error, never a reason to create one.
pub fn load_key(path: &Path) -> Result<SigningKeyPair, SetupError> {
    let text = read_secret(path)?.ok_or_else(|| SetupError::NoKey(path.display().to_string()))?;
    SigningKeyPair::from_key_file(&text).map_err(|e| file_err(path, e.to_string()))
}

/// Loads the signing key, creating it (mode 0600) if the file does not exist, and makes
/// sure its public half is written beside it. Only the processes that sign (`warden
/// serve`, `warden init`, the CLI's credential commands) call this.
pub fn load_or_create_key(path: &Path) -> Result<SigningKeyPair, SetupError> {
    let key = match read_secret(path)? {
        Some(text) => {
            SigningKeyPair::from_key_file(&text).map_err(|e| file_err(path, e.to_string()))?
        }
        None => {
            let key = generate_key()?;
            write_secret(path, &key.to_key_file())?;
            tracing::info!(path = %path.display(), kid = key.kid(), "created a new signing key");
            key
        }
    };
    write_public_key(path, &key)?;
    Ok(key)
}

/// Writes the public key file beside `key_file` with `key` as its current key, keeping
/// the keys an earlier rotation retired until their `until` passes; unless it already
/// says exactly that. It is replaced whole (a temporary file renamed over it), so a
/// reader never sees half a key set.
pub fn write_public_key(key_file: &Path, key: &SigningKeyPair) -> Result<(), SetupError> {
    write_public_keys(key_file, key, None, SystemClock.now_ns())
}

/// How long a retired key stays in the public key file after it stopped verifying.
const RETIRED_KEY_MEMORY_SECS: u64 = 90 * 86_400;

/// The key set with `key` current, `retired` (if any) valid until its `until`, and the
/// keys the file already retired that still verify at `now`.
fn write_public_keys(
    key_file: &Path,
    key: &SigningKeyPair,
    retired: Option<PublicKey>,
    now: Nanos,
) -> Result<(), SetupError> {
    let path = public_key_path(key_file);
    // An unreadable key set is rewritten from the private key alone; one that others may
    // write is refused, never laundered into a file of proper mode.
    let existing = read_public_keys(&path)?
        .and_then(|t| public_keys_from_file(&t).ok())
        .unwrap_or_default();
    let current = PublicKey::current(key.verifying_key());
    let mut keys = vec![current];
    for k in retired.into_iter().chain(existing) {
        let fresh = k.key != current.key && !keys.iter().any(|x| x.key == k.key);
        // A retired key stays listed (not in the JWKS, not verifying) for a while after
        // its overlap, so a token it signed is refused as expired, naming the fix,
        // rather than as signed by a stranger.
        let remembered = k
            .until
            .is_some_and(|u| u.saturating_add(RETIRED_KEY_MEMORY_SECS) > now / NANOS_PER_SEC);
        if fresh && remembered {
            keys.push(k);
        }
    }
    let text = public_keys_to_file(&keys);
    if fs::read_to_string(&path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("pub.tmp{}", std::process::id()));
    // `create_new`: never follow a link planted at the temporary name. 0644 whatever
    // the umask: anyone may read a public key, only its owner may replace it (the
    // embedded proxy trusts whatever key this file holds).
    write_new(&tmp, &text, 0o644)
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            file_err(&path, format!("cannot write the public key: {e}"))
        })
}

fn write_new(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    opts.open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()).and_then(|()| f.sync_all()))
}

/// Replaces the signing key at `key_file` with a new one. The public key file names the
/// new key current and keeps the old one until `now + overlap_ns`, so tokens it signed
/// still verify until then, on this node and on every host that reads the file or the
/// JWKS. The public file is written first: a verifier that reads it between the two
/// writes already knows the new key before anything is signed with it. Returns the new
/// key and the old key's id.
pub fn rotate_key(
    key_file: &Path,
    overlap_ns: Nanos,
    now: Nanos,
) -> Result<(SigningKeyPair, String), SetupError> {
    let old = load_key(key_file)?;
    let new = generate_key()?;
    let until = now.saturating_add(overlap_ns) / NANOS_PER_SEC;
    let retired = PublicKey {
        key: old.verifying_key(),
        until: Some(until),
    };
    write_public_keys(key_file, &new, Some(retired), now)?;
    let tmp = key_file.with_extension(format!("key.tmp{}", std::process::id()));
    write_new(&tmp, &new.to_key_file(), 0o600)
        .and_then(|()| fs::rename(&tmp, key_file))
        .map_err(|e| {
            let _ = fs::remove_file(&tmp);
            file_err(key_file, format!("cannot write the new signing key: {e}"))
        })?;
    Ok((new, old.kid().to_owned()))
}

/// Loads the keys that verify the node's tokens, from the public key file beside the key
/// file named in the config: the current key and those a rotation retired. Never opens
/// the private key.
pub fn load_public_keys(key_file: &Path) -> Result<Vec<PublicKey>, SetupError> {
    let path = public_key_path(key_file);
    let text = read_public_keys(&path)?
        .ok_or_else(|| SetupError::NoPublicKey(path.display().to_string()))?;
    public_keys_from_file(&text).map_err(|e| file_err(&path, e.to_string()))
}

/// The public key file's text, if it exists. Whoever may replace this file may swap in a
/// key of their own and mint tokens every verifier accepts: one that group or others may
/// write is refused, both when it is loaded and when a node rewrites it (which would
/// otherwise carry a planted key over into a file of proper mode).
fn read_public_keys(path: &Path) -> Result<Option<String>, SetupError> {
    read_guarded(path, 0o022, || {
        file_err(
            path,
            format!(
                "group or others may write the public key, and so swap in their own; \
                 run `chmod 644 {}`",
                path.display()
            ),
        )
    })
}

pub fn new_operator_token() -> Result<String, SetupError> {
    random_hex(32)
        .map(|h| format!("wop_{h}"))
        .map_err(|e| SetupError::Random(e.to_string()))
}

/// The operator token: `WARDEN_OPERATOR_TOKEN` if set, else the token file. Either way
/// it must be at least [`MIN_OPERATOR_TOKEN_LEN`] characters.
pub fn operator_token(settings: &Settings) -> Result<String, SetupError> {
    let (token, from) = match settings
        .operator_token_env
        .as_ref()
        .filter(|t| !t.is_empty())
    {
        Some(t) => (t.trim().to_owned(), "WARDEN_OPERATOR_TOKEN".to_owned()),
        None => {
            let path = &settings.operator_token_file;
            let text = read_secret(path)?
                .ok_or_else(|| SetupError::NoOperatorToken(path.display().to_string()))?;
            (text.trim().to_owned(), format!("`{}`", path.display()))
        }
    };
    if token.chars().count() < MIN_OPERATOR_TOKEN_LEN {
        return Err(SetupError::ShortOperatorToken(from));
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// A key planted in a public key file others may write is neither loaded nor carried
    /// over when the node rewrites the file.
    #[cfg(unix)]
    #[test]
    fn a_writable_public_key_file_is_refused_not_rewritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("warden.key");
        load_or_create_key(&key_file).unwrap();
        let pub_path = public_key_path(&key_file);
        let planted = generate_key().unwrap();
        let mut text = fs::read_to_string(&pub_path).unwrap();
        text.push_str(&format!(
            "ed25519-public:{} until=4000000000\n",
            hex::encode(planted.verifying_key().to_bytes())
        ));
        fs::write(&pub_path, &text).unwrap();
        fs::set_permissions(&pub_path, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(
            load_or_create_key(&key_file).is_err(),
            "the rewrite refuses it"
        );
        assert!(load_public_keys(&key_file).is_err(), "and so does loading");
        assert_eq!(
            fs::read_to_string(&pub_path).unwrap(),
            text,
            "nothing laundered"
        );
        // Once its owner fixes the mode, the file is trusted as the owner left it.
        fs::set_permissions(&pub_path, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load_public_keys(&key_file).unwrap().len(), 2);
    }

    fn settings(dir: &Path, env_token: Option<&str>) -> Settings {
        let text = "[identity]\nissuer = \"t\"\n[policy]\nschema = \"s\"\npolicies = \"p\"\n";
        let env = |k: &str| match k {
            "WARDEN_OPERATOR_TOKEN" => env_token.map(str::to_owned),
            _ => None,
        };
        Settings::from_toml(text, "warden.toml", dir, &env).unwrap()
    }

    #[cfg(unix)]
    fn chmod(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn secrets_others_may_read_are_refused_naming_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("warden.key");
        write_secret(&key, &generate_key().unwrap().to_key_file()).unwrap();
        chmod(&key, 0o644);
        let e = load_or_create_key(&key).unwrap_err().to_string();
        assert!(
            e.contains(&format!("run `chmod 600 {}`", key.display())),
            "{e}"
        );
        let e = load_key(&key).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        chmod(&key, 0o600);
        load_key(&key).unwrap();

        let s = settings(dir.path(), None);
        write_secret(&s.operator_token_file, &format!("{}\n", "x".repeat(40))).unwrap();
        chmod(&s.operator_token_file, 0o640);
        let e = operator_token(&s).unwrap_err().to_string();
        assert!(
            e.contains(&format!("chmod 600 {}", s.operator_token_file.display())),
            "{e}"
        );
        chmod(&s.operator_token_file, 0o600);
        assert_eq!(operator_token(&s).unwrap(), "x".repeat(40));
    }

    #[test]
    fn a_short_operator_token_is_refused_however_it_is_given() {
        let dir = tempfile::tempdir().unwrap();
        let short = "x".repeat(MIN_OPERATOR_TOKEN_LEN - 1);
        let e = operator_token(&settings(dir.path(), Some(&short)))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("WARDEN_OPERATOR_TOKEN") && e.contains("shorter"),
            "{e}"
        );
        let s = settings(dir.path(), None);
        write_secret(&s.operator_token_file, &format!("{short}\n")).unwrap();
        let e = operator_token(&s).unwrap_err().to_string();
        assert!(e.contains("shorter"), "{e}");
        let long = "y".repeat(MIN_OPERATOR_TOKEN_LEN);
        assert_eq!(
            operator_token(&settings(dir.path(), Some(&long))).unwrap(),
            long
        );
    }

    #[test]
    fn loading_a_key_never_creates_one_and_creating_writes_the_public_half() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("warden.key");
        let e = load_key(&key).unwrap_err().to_string();
        assert!(e.contains("no signing key at"), "{e}");
        assert!(!key.exists());
        assert!(load_public_keys(&key).is_err());
        assert!(!key.exists());

        let k = load_or_create_key(&key).unwrap();
        assert_eq!(
            load_public_keys(&key).unwrap(),
            vec![PublicKey::current(k.verifying_key())]
        );
        assert_eq!(public_key_path(&key), dir.path().join("warden.pub"));
        assert_eq!(
            public_key_path(Path::new("/k/signing.pub")),
            Path::new("/k/signing.pub.pub")
        );
    }

    /// Regression: the embedded proxy trusted `warden.pub` whatever its mode, and it was
    /// written with the umask's mode: a group member could swap in a key of their own.
    #[cfg(unix)]
    #[test]
    fn a_public_key_others_may_write_is_refused_and_it_is_written_0644() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("warden.key");
        load_or_create_key(&key).unwrap();
        let public = public_key_path(&key);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&public), 0o644);
        fs::set_permissions(&public, fs::Permissions::from_mode(0o664)).unwrap();
        let e = load_public_keys(&key).unwrap_err().to_string();
        assert!(e.contains("chmod 644"), "{e}");
        fs::set_permissions(&public, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load_public_keys(&key).is_ok());
    }
}
