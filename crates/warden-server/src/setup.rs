//! Files a node needs besides its config: the signing key and the operator token.

use std::fs;
use std::io::Write;
use std::path::Path;

use warden_core::config::Settings;
use warden_core::identity::SigningKeyPair;

use crate::ids::random_hex;

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(
        "no operator token: set WARDEN_OPERATOR_TOKEN or write one to {0} (`warden init` does)"
    )]
    NoOperatorToken(String),
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

pub fn generate_key() -> Result<SigningKeyPair, SetupError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| SetupError::Random(e.to_string()))?;
    Ok(SigningKeyPair::from_seed(seed))
}

/// Loads the signing key, creating it (mode 0600) if the file does not exist.
pub fn load_or_create_key(path: &Path) -> Result<SigningKeyPair, SetupError> {
    match fs::read_to_string(path) {
        Ok(text) => SigningKeyPair::from_key_file(&text).map_err(|e| file_err(path, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = generate_key()?;
            write_secret(path, &key.to_key_file())?;
            tracing::info!(path = %path.display(), kid = key.kid(), "created a new signing key");
            Ok(key)
        }
        Err(e) => Err(file_err(path, format!("cannot read: {e}"))),
    }
}

pub fn new_operator_token() -> Result<String, SetupError> {
    random_hex(32)
        .map(|h| format!("wop_{h}"))
        .map_err(|e| SetupError::Random(e.to_string()))
}

/// The operator token: `WARDEN_OPERATOR_TOKEN` if set, else the token file.
pub fn operator_token(settings: &Settings) -> Result<String, SetupError> {
    if let Some(t) = settings
        .operator_token_env
        .as_ref()
        .filter(|t| !t.is_empty())
    {
        return Ok(t.clone());
    }
    let path = &settings.operator_token_file;
    match fs::read_to_string(path) {
        Ok(t) if t.trim().len() >= 16 => Ok(t.trim().to_owned()),
        Ok(_) => Err(file_err(
            path,
            "operator token is shorter than 16 characters; use a long random secret",
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(SetupError::NoOperatorToken(path.display().to_string()))
        }
        Err(e) => Err(file_err(path, format!("cannot read: {e}"))),
    }
}
