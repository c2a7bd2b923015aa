//! `Range` headers for blob reads and `Content-Range` headers for chunked
//! uploads.

use std::ops::Range;
use std::str::FromStr;

/// A single byte range from a `Range: bytes=...` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `bytes=a-b` (inclusive) or `bytes=a-` (to the end).
    From { start: u64, end: Option<u64> },
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("malformed Range header")]
    Malformed,
    /// Several ranges: valid HTTP, but wharf answers them with the whole body.
    #[error("multiple ranges are not supported")]
    Multiple,
}

impl FromStr for ByteRange {
    type Err = RangeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let spec = s
            .trim()
            .strip_prefix("bytes=")
            .ok_or(RangeError::Malformed)?;
        if spec.contains(',') {
            return Err(RangeError::Multiple);
        }
        let (a, b) = spec.trim().split_once('-').ok_or(RangeError::Malformed)?;
        let num = |x: &str| -> Result<u64, RangeError> {
            if x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()) {
                return Err(RangeError::Malformed);
            }
            x.parse().map_err(|_| RangeError::Malformed)
        };
        if a.is_empty() {
            return Ok(ByteRange::Suffix(num(b)?));
        }
        let start = num(a)?;
        let end = if b.is_empty() { None } else { Some(num(b)?) };
        if end.is_some_and(|e| e < start) {
            return Err(RangeError::Malformed);
        }
        Ok(ByteRange::From { start, end })
    }
}

impl ByteRange {
    /// The half-open byte range this selects in a blob of `size` bytes, or
    /// `None` when it is unsatisfiable (416).
    pub fn resolve(self, size: u64) -> Option<Range<u64>> {
        match self {
            ByteRange::From { start, end } => {
                if start >= size {
                    return None;
                }
                let end = end.map_or(size, |e| e.saturating_add(1).min(size));
                Some(start..end)
            }
            ByteRange::Suffix(n) => {
                if n == 0 || size == 0 {
                    return None;
                }
                Some(size.saturating_sub(n)..size)
            }
        }
    }
}

/// The `Content-Range` of a chunked upload PATCH: `<start>-<end>` inclusive
/// (also accepted: `bytes <start>-<end>/<total or *>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadRange {
    pub start: u64,
    pub end: u64,
}

impl FromStr for UploadRange {
    type Err = RangeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let s = s.strip_prefix("bytes ").unwrap_or(s);
        let s = s.split_once('/').map_or(s, |(r, _)| r);
        let (a, b) = s.split_once('-').ok_or(RangeError::Malformed)?;
        let num = |x: &str| -> Result<u64, RangeError> {
            if x.is_empty() || !x.bytes().all(|c| c.is_ascii_digit()) {
                return Err(RangeError::Malformed);
            }
            x.parse().map_err(|_| RangeError::Malformed)
        };
        let (start, end) = (num(a)?, num(b)?);
        if end < start {
            return Err(RangeError::Malformed);
        }
        Ok(UploadRange { start, end })
    }
}

impl UploadRange {
    pub fn len(&self) -> u64 {
        self.end - self.start + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ranges() {
        let r: ByteRange = "bytes=0-9".parse().unwrap();
        assert_eq!(r.resolve(100), Some(0..10));
        assert_eq!(r.resolve(5), Some(0..5));
        let r: ByteRange = "bytes=10-".parse().unwrap();
        assert_eq!(r.resolve(100), Some(10..100));
        assert_eq!(r.resolve(10), None);
        let r: ByteRange = "bytes=-5".parse().unwrap();
        assert_eq!(r.resolve(100), Some(95..100));
        assert_eq!(r.resolve(3), Some(0..3));
        assert_eq!("bytes=5-1".parse::<ByteRange>(), Err(RangeError::Malformed));
        assert_eq!(
            "bytes=0-1,5-6".parse::<ByteRange>(),
            Err(RangeError::Multiple)
        );
        assert!("items=0-1".parse::<ByteRange>().is_err());
        assert!("bytes=a-b".parse::<ByteRange>().is_err());
    }

    #[test]
    fn upload_ranges() {
        assert_eq!(
            "0-99".parse::<UploadRange>().unwrap(),
            UploadRange { start: 0, end: 99 }
        );
        assert_eq!(
            "bytes 100-199/*".parse::<UploadRange>().unwrap(),
            UploadRange {
                start: 100,
                end: 199
            }
        );
        assert!("5-1".parse::<UploadRange>().is_err());
        assert!("-1".parse::<UploadRange>().is_err());
    }

    proptest! {
        #[test]
        fn byte_range_round_trip(start in 0u64..1<<40, len in 0u64..1<<20, size in 0u64..1<<41) {
            let end = start + len;
            let r: ByteRange = format!("bytes={start}-{end}").parse().unwrap();
            prop_assert_eq!(r, ByteRange::From { start, end: Some(end) });
            match r.resolve(size) {
                Some(x) => { prop_assert!(x.start == start && x.end <= size && x.end > x.start); }
                None => prop_assert!(start >= size),
            }
        }

        #[test]
        fn upload_range_round_trip(start in 0u64..1<<40, len in 0u64..1<<30) {
            let end = start + len;
            let r: UploadRange = format!("{start}-{end}").parse().unwrap();
            prop_assert_eq!(r.len(), len + 1);
        }

        #[test]
        fn never_panics(s in ".{0,64}") {
            let _ = s.parse::<ByteRange>();
            let _ = s.parse::<UploadRange>();
        }
    }
}
