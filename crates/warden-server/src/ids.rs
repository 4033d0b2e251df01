//! Identifiers: call ids, trace and span ids, credential ids, secrets.

use warden_core::clock::{Nanos, NANOS_PER_MILLI};

/// `n` random bytes as lowercase hex. Falls back to an error the caller must handle: an
/// id that is not random would let one call's outcome be reported as another's.
pub fn random_hex(n: usize) -> Result<String, getrandom::Error> {
    let mut buf = vec![0u8; n];
    getrandom::getrandom(&mut buf)?;
    Ok(hex::encode(buf))
}

/// A call id: 16 bytes as 32 lowercase hex digits, the first 6 the milliseconds since
/// the epoch (big-endian, as in a UUIDv7) and the other 10 random.
///
/// The time prefix is for the audit store, which indexes `call_id`: a purely random id
/// lands each new entry on a random page of that index, so a group commit of n entries
/// dirtied about n index pages, all written to the WAL and copied back at the next
/// checkpoint. Ids that grow with time append to the index's last pages instead. The
/// 80 random bits keep ids unique and unguessable.
pub fn call_id(now_ns: Nanos) -> Result<String, getrandom::Error> {
    let mut buf = [0u8; 16];
    let (time, random) = buf.split_at_mut(6);
    let ms = (now_ns / NANOS_PER_MILLI).to_be_bytes();
    time.copy_from_slice(&ms[2..]);
    getrandom::getrandom(random)?;
    Ok(hex::encode(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids() {
        assert_eq!(random_hex(16).unwrap().len(), 32);
        assert_ne!(random_hex(16).unwrap(), random_hex(16).unwrap());
    }

    #[test]
    fn call_ids_grow_with_time_and_stay_unique() {
        let t = 1_764_000_000_000 * NANOS_PER_MILLI;
        let (a, b) = (call_id(t).unwrap(), call_id(t).unwrap());
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        assert_eq!(a[..12], b[..12], "same millisecond, same prefix");
        assert_ne!(a, b, "the random part differs");
        let later = call_id(t + NANOS_PER_MILLI).unwrap();
        assert!(later > a && later > b, "{later} sorts after {a} and {b}");
        assert_eq!(&a[..12], &format!("{:012x}", t / NANOS_PER_MILLI));
    }
}
