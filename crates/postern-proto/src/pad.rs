//! Padding of frames to a few fixed sizes, so sizes on the wire reveal only the bucket.
//!
//! A padded frame is `length u32 · frame · zero bytes`, exactly one of [`BUCKETS`] long.

use crate::DecodeError;
use crate::limits::{BUCKETS, MAX_FRAME};

/// Largest frame that fits in the largest bucket.
pub const MAX_UNPADDED: usize = MAX_FRAME - 4;

/// Pads `frame` to the smallest bucket that holds it and its length prefix.
///
/// Returns `None` when the frame is larger than [`MAX_UNPADDED`].
pub fn pad(frame: &[u8]) -> Option<Vec<u8>> {
    let needed = frame.len() + 4;
    let bucket = *BUCKETS.iter().find(|b| **b >= needed)?;
    let len = u32::try_from(frame.len()).ok()?;
    let mut out = Vec::with_capacity(bucket);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(frame);
    out.resize(bucket, 0);
    Some(out)
}

/// Removes padding. The input must be exactly the smallest bucket that holds the frame (one
/// encoding per frame, as [`pad`] makes it) and the padding all zeros.
pub fn unpad(padded: &[u8]) -> Result<&[u8], DecodeError> {
    if !BUCKETS.contains(&padded.len()) {
        return Err(DecodeError::Invalid("padding bucket"));
    }
    let (len, rest) = padded.split_at(4);
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if len > rest.len() {
        return Err(DecodeError::Truncated);
    }
    if BUCKETS.iter().find(|b| **b >= len + 4) != Some(&padded.len()) {
        return Err(DecodeError::Invalid("padding bucket larger than the frame needs"));
    }
    let (frame, padding) = rest.split_at(len);
    if padding.iter().any(|b| *b != 0) {
        return Err(DecodeError::Invalid("padding"));
    }
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_land_in_buckets() {
        for (len, bucket) in [(0, 256), (252, 256), (253, 1024), (4092, 4096), (4093, MAX_FRAME)] {
            let padded = pad(&vec![7; len]).unwrap();
            assert_eq!(padded.len(), bucket, "frame of {len}");
            assert_eq!(unpad(&padded).unwrap(), &vec![7; len][..]);
        }
        assert!(pad(&vec![0; MAX_UNPADDED + 1]).is_none());
    }

    #[test]
    fn rejects_bad_padding() {
        let mut padded = pad(b"abc").unwrap();
        padded[200] = 1;
        assert!(unpad(&padded).is_err());
        assert!(unpad(&padded[..255]).is_err());
        let mut long = pad(b"abc").unwrap();
        long[..4].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(unpad(&long), Err(DecodeError::Truncated));
    }

    #[test]
    fn only_the_smallest_bucket_is_accepted() {
        // Found by the padding fuzz target: an empty frame in the 1,024-byte bucket unpadded,
        // and padded again to 256 bytes.
        assert!(unpad(&[0u8; 1024]).is_err());
        let mut big = vec![0u8; 1024];
        big[..4].copy_from_slice(&300u32.to_be_bytes());
        assert_eq!(unpad(&big).map(<[u8]>::len), Ok(300));
    }

    proptest::proptest! {
        #[test]
        fn any_frame_round_trips_and_repads_to_the_same_bytes(frame in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..=MAX_UNPADDED)) {
            let padded = pad(&frame).unwrap();
            proptest::prop_assert_eq!(unpad(&padded), Ok(&frame[..]));
        }
    }
}
