//! The caller's deadline: read from the `grpc-timeout` header of an incoming call and handed
//! on, shortened by the time already spent, to every hop that follows.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The instant the caller stops waiting, when it set one.
pub fn from_metadata(metadata: &MetadataMap) -> Result<Option<Instant>, String> {
    let Some(value) = metadata.get(GRPC_TIMEOUT) else { return Ok(None) };
    let text = value.to_str().map_err(|_| "grpc-timeout header is not ASCII".to_string())?;
    parse_timeout(text).map(|timeout| Some(Instant::now() + timeout))
}

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let bad = || format!("grpc-timeout '{text}' is malformed (want up to 8 digits and one of H M S m u n)");
    if text.len() < 2 || text.len() > 9 {
        return Err(bad());
    }
    let (digits, unit) = text.split_at(text.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    Ok(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return Err(bad()),
    })
}

/// Time left until `deadline`, zero once it has passed.
pub fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses() {
        assert_eq!(parse_timeout("2H").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_timeout("3M").unwrap(), Duration::from_secs(180));
        assert_eq!(parse_timeout("4S").unwrap(), Duration::from_secs(4));
        assert_eq!(parse_timeout("250m").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_timeout("99999999u").unwrap(), Duration::from_micros(99_999_999));
        assert_eq!(parse_timeout("7n").unwrap(), Duration::from_nanos(7));
    }

    #[test]
    fn malformed_values_are_named() {
        for bad in ["", "5", "m", "5x", "-5m", "123456789S", "1.5S"] {
            let err = parse_timeout(bad).unwrap_err();
            assert!(err.contains(&format!("'{bad}'")), "{err}");
        }
    }

    #[test]
    fn a_present_header_becomes_a_future_instant() {
        let mut md = MetadataMap::new();
        assert_eq!(from_metadata(&md).unwrap(), None);
        md.insert(GRPC_TIMEOUT, "5S".parse().unwrap());
        let deadline = from_metadata(&md).unwrap().unwrap();
        let left = remaining(deadline);
        assert!(left > Duration::from_secs(4) && left <= Duration::from_secs(5), "{left:?}");
    }
}
