//! How SQLite's failures become [`StoreError`]s.
//!
//! Callers act on the class of an error, not its text: `Unavailable` means "deny and try
//! again later", `Corrupt` means "an operator must look at the file", `Conflict` means
//! "the request was wrong". So the mapping is decided here, once, by SQLite's result
//! code, and every message names the file so an operator knows which one to look at.

use std::path::Path;

use rusqlite::ErrorCode;
use warden_core::store::StoreError;

/// Classifies a rusqlite error for the store at `path`.
pub(crate) fn classify(path: &Path, e: &rusqlite::Error) -> StoreError {
    let at = path.display();
    match e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::NotADatabase => {
                StoreError::Corrupt(format!("`{at}` is not a SQLite database ({e})"))
            }
            ErrorCode::DatabaseCorrupt => StoreError::Corrupt(format!("`{at}`: {e}")),
            ErrorCode::ConstraintViolation => StoreError::Conflict(format!("`{at}`: {e}")),
            // Busy, locked, read-only, I/O, disk full, cannot open, permission denied,
            // out of memory and anything SQLite may add later: the write did not
            // happen, and the caller fails closed. Treating unknown codes as transient
            // rather than corrupt keeps an operator from chasing a healthy file.
            _ => StoreError::Unavailable(format!("`{at}`: {e}")),
        },
        // A value that does not have the type or range the schema promises.
        rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..)
        | rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(format!("`{at}`: {e}")),
        _ => StoreError::Unavailable(format!("`{at}`: {e}")),
    }
}

/// Attaches the store's path to rusqlite results.
pub(crate) trait At<T> {
    fn at(self, path: &Path) -> Result<T, StoreError>;
}

impl<T> At<T> for rusqlite::Result<T> {
    fn at(self, path: &Path) -> Result<T, StoreError> {
        self.map_err(|e| classify(path, &e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::ffi;

    fn failure(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    #[test]
    fn transient_and_environmental_failures_are_unavailable() {
        let p = Path::new("/var/lib/warden/warden.db");
        for code in [
            ffi::SQLITE_BUSY,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_READONLY,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_FULL,
            ffi::SQLITE_CANTOPEN,
            ffi::SQLITE_PERM,
        ] {
            match classify(p, &failure(code)) {
                StoreError::Unavailable(m) => {
                    assert!(m.contains("/var/lib/warden/warden.db"), "{m}")
                }
                other => panic!("code {code} mapped to {other:?}"),
            }
        }
    }

    #[test]
    fn decode_and_format_failures_are_corrupt() {
        let p = Path::new("x.db");
        assert!(
            matches!(classify(p, &failure(ffi::SQLITE_NOTADB)), StoreError::Corrupt(m) if m.contains("not a SQLite database"))
        );
        assert!(matches!(
            classify(p, &failure(ffi::SQLITE_CORRUPT)),
            StoreError::Corrupt(_)
        ));
        assert!(matches!(
            classify(p, &rusqlite::Error::IntegralValueOutOfRange(1, -1)),
            StoreError::Corrupt(_)
        ));
        assert!(matches!(
            classify(p, &failure(ffi::SQLITE_CONSTRAINT_PRIMARYKEY)),
            StoreError::Conflict(_)
        ));
    }
}
