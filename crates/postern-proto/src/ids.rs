//! Fixed-size identifiers and keys. None of them is meaningful to the server: all are random or
//! derived by clients. `Debug` shows only a short prefix so logs cannot link activity by id.

use sha2::{Digest, Sha256};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub [u8; $len]);

        impl $name {
            /// Length in bytes.
            pub const LEN: usize = $len;

            /// The raw bytes.
            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}({:02x}{:02x}…)", stringify!($name), self.0[0], self.0[1])
            }
        }
    };
}

id_type!(
    /// A mailbox's private id: only its owner uses it (to fetch, delete and manage).
    MailboxId, 32
);
id_type!(
    /// A drop address of a mailbox: anyone holding it may drop sealed items there.
    DropId, 32
);
id_type!(
    /// A conversation log's id: knowing it allows reading and subscribing.
    LogId, 32
);
id_type!(
    /// A client-chosen idempotency key: a retry with the same key returns the first result.
    IdemKey, 16
);
id_type!(
    /// A client-chosen id for a chunked upload.
    UploadId, 16
);
id_type!(
    /// A random per-device id under which a device's key packages are pooled.
    DeviceId, 16
);
id_type!(
    /// The short id of an append key: the first 8 bytes of a domain-separated SHA-256.
    KeyId, 8
);
id_type!(
    /// An Ed25519 public key (mailbox owner key or per-epoch append key).
    PublicKey, 32
);
id_type!(
    /// SHA-256 of a claim token: what the server stores in place of the token.
    TokenHash, 32
);

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Signature(pub [u8; 64]);

impl std::fmt::Debug for Signature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signature(…)")
    }
}

/// A claim token: the secret half of a key-package claim, carried in an invite.
#[derive(Clone, PartialEq, Eq, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct ClaimToken(pub [u8; 32]);

impl std::fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClaimToken(<redacted>)")
    }
}

impl ClaimToken {
    /// What the server stores and looks the token up by.
    pub fn hash(&self) -> TokenHash {
        let mut h = Sha256::new();
        h.update(b"postern/v1/claim-token\0");
        h.update(self.0);
        TokenHash(h.finalize().into())
    }
}

impl IdemKey {
    /// A fresh key: the sender's clock in whole seconds since the Unix epoch (4 bytes,
    /// big-endian; it saturates in 2106), then 12 random bytes.
    ///
    /// The server answers retries through an index of `(log, key)`. Keys that grow with time
    /// land at the end of each log's part of that index, where random keys would each dirty a
    /// page of their own at every commit: a store writing random keys did 60 % more work per
    /// append (BENCHMARKS.md). The time tells the server when the key was made, which for a
    /// message sent at once is when it arrives; no one reads it back.
    pub fn ordered(unix_secs: u64, random: [u8; 12]) -> Self {
        let secs = u32::try_from(unix_secs).unwrap_or(u32::MAX);
        let mut key = [0u8; 16];
        key[..4].copy_from_slice(&secs.to_be_bytes());
        key[4..].copy_from_slice(&random);
        IdemKey(key)
    }
}

impl PublicKey {
    /// The short id under which this key is registered for a log.
    pub fn key_id(&self) -> KeyId {
        let mut h = Sha256::new();
        h.update(b"postern/v1/key-id\0");
        h.update(self.0);
        let digest = h.finalize();
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        KeyId(id)
    }

    /// Verifies an Ed25519 signature by this key. Any failure, including a key that is not a
    /// valid curve point, is the same `false`.
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        PreparedKey::new(self).is_some_and(|key| key.verify(message, signature))
    }
}

/// A public key decoded once (its curve point decompressed, its id computed) for verifying
/// many signatures: what a server keeps for a log's append key.
#[derive(Debug, Clone)]
pub struct PreparedKey {
    id: KeyId,
    key: ed25519_dalek::VerifyingKey,
}

impl PreparedKey {
    /// `None` if the bytes are not a valid curve point.
    pub fn new(key: &PublicKey) -> Option<Self> {
        let id = key.key_id();
        ed25519_dalek::VerifyingKey::from_bytes(&key.0).ok().map(|key| PreparedKey { id, key })
    }

    /// The key's id (see [`PublicKey::key_id`]).
    pub fn key_id(&self) -> KeyId {
        self.id
    }

    /// The key's wire form.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.key.to_bytes())
    }

    /// Verifies an Ed25519 signature (strictly: no small-order keys or malleable signatures).
    pub fn verify(&self, message: &[u8], signature: &Signature) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
        self.key.verify_strict(message, &sig).is_ok()
    }
}

/// Signs `message` with an Ed25519 signing key (used by clients and tests).
pub fn sign(key: &ed25519_dalek::SigningKey, message: &[u8]) -> Signature {
    use ed25519_dalek::Signer;
    Signature(key.sign(message).to_bytes())
}

/// The public half of an Ed25519 signing key, as a wire [`PublicKey`].
pub fn public_key(key: &ed25519_dalek::SigningKey) -> PublicKey {
    PublicKey(key.verifying_key().to_bytes())
}

#[cfg(test)]
mod tests {
    use super::IdemKey;

    #[test]
    fn ordered_keys_sort_by_their_second_and_keep_the_random_part() {
        let early = IdemKey::ordered(1_780_000_000, [0xff; 12]);
        let late = IdemKey::ordered(1_780_000_001, [0; 12]);
        assert!(early < late, "a later second sorts after whatever the random part");
        assert_eq!(early.0[..4], 1_780_000_000u32.to_be_bytes());
        assert_eq!(early.0[4..], [0xff; 12]);
        assert_eq!(IdemKey::ordered(u64::MAX, [1; 12]).0[..4], [0xff; 4], "saturates");
    }
}
