//! Protocol limits. Every decoder enforces them before allocating.

/// Padded plaintext size of the largest frame (the largest padding bucket).
pub const MAX_FRAME: usize = 17_408;
/// Padding buckets: every frame is padded to the smallest bucket that holds it.
pub const BUCKETS: [usize; 4] = [256, 1_024, 4_096, MAX_FRAME];
/// Largest entry body carried inline in one frame; larger entries use chunked upload.
pub const MAX_INLINE: usize = 16_384;
/// Largest log entry or mailbox drop, after reassembly of an upload.
pub const MAX_ENTRY: usize = 1_048_576;
/// Most items returned by one read.
pub const MAX_ITEMS: usize = 64;
/// The least `max_bytes` a read, a part or a subscription's pushes may ask for: smaller
/// asks get this many bytes. Asking for `u16::MAX` gets the server's own limit.
pub const MIN_READ_BYTES: usize = 256;
/// Most key packages in one upload.
pub const MAX_KEY_PACKAGES_PER_UPLOAD: usize = 32;
/// Largest encrypted key package (sized for post-quantum suites).
pub const MAX_KEY_PACKAGE: usize = 4_096;
/// Most devices whose key packages one claim returns.
pub const MAX_DEVICES: usize = 16;
