//! The envelope: what a conversation log stores for each entry.
//!
//! ```text
//! version u8 (1) · key_id [8] · idem [16] · flags u8 · [next_key 32 if flags&1]
//!   · ciphertext (u32 length, at most MAX_ENTRY) · signature [64]
//! ```
//!
//! The signature is by the append key registered for `key_id` on this log, over a context
//! string, the log id and every envelope byte before the signature. Members verify it with the
//! key they derived themselves; the server verifies it with the key registered for the log.
//! The ciphertext is AEAD under a key only members derive, so neither the server nor a relay
//! sees group id, content type or membership. An entry that carries `next_key` (a commit)
//! registers that key for appends in the next epoch.

use crate::DecodeError;
use crate::codec::{Reader, Writer};
use crate::ids::{IdemKey, KeyId, LogId, PreparedKey, PublicKey, Signature};
use crate::limits::MAX_ENTRY;

const ENVELOPE_VERSION: u8 = 1;
const FLAG_NEXT_KEY: u8 = 1;
const SIGNING_CONTEXT: &[u8] = b"postern/v1/envelope\0";

/// A decoded envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Which registered append key signed it.
    pub key_id: KeyId,
    /// The idempotency key: a retry of the same envelope returns the first sequence number.
    pub idem: IdemKey,
    /// The append key for the next epoch, on commits only.
    pub next_key: Option<PublicKey>,
    /// AEAD-encrypted MLS message; opaque to the server.
    pub ciphertext: Vec<u8>,
    /// Signature by the key behind `key_id`.
    pub signature: Signature,
}

impl Envelope {
    /// Builds and signs an envelope for `log`.
    pub fn seal(
        log: &LogId,
        key: &ed25519_dalek::SigningKey,
        idem: IdemKey,
        next_key: Option<PublicKey>,
        ciphertext: Vec<u8>,
    ) -> Self {
        let mut env = Envelope {
            key_id: crate::ids::public_key(key).key_id(),
            idem,
            next_key,
            ciphertext,
            signature: Signature([0; 64]),
        };
        env.signature = crate::ids::sign(key, &env.signing_input(log));
        env
    }

    fn encode_unsigned(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(ENVELOPE_VERSION).fixed(&self.key_id.0).fixed(&self.idem.0);
        match &self.next_key {
            Some(k) => w.u8(FLAG_NEXT_KEY).fixed(&k.0),
            None => w.u8(0),
        };
        w.bytes(&self.ciphertext);
        w.finish()
    }

    /// The bytes the signature covers.
    pub fn signing_input(&self, log: &LogId) -> Vec<u8> {
        let mut out = Vec::with_capacity(SIGNING_CONTEXT.len() + 32 + 64 + self.ciphertext.len());
        out.extend_from_slice(SIGNING_CONTEXT);
        out.extend_from_slice(&log.0);
        out.extend_from_slice(&self.encode_unsigned());
        out
    }

    /// Whether `key` signed this envelope for `log`.
    pub fn verify(&self, log: &LogId, key: &PublicKey) -> bool {
        PreparedKey::new(key).is_some_and(|key| self.verify_prepared(log, &key))
    }

    /// [`verify`](Self::verify) with a key decoded beforehand.
    pub fn verify_prepared(&self, log: &LogId, key: &PreparedKey) -> bool {
        key.key_id() == self.key_id && key.verify(&self.signing_input(log), &self.signature)
    }

    /// The key id of an encoded envelope, read without decoding the rest (`None` if the
    /// bytes do not start like an envelope).
    pub fn key_id_of(bytes: &[u8]) -> Option<KeyId> {
        let (&version, rest) = bytes.split_first()?;
        let id: [u8; 8] = rest.get(..8)?.try_into().ok()?;
        (version == ENVELOPE_VERSION).then_some(KeyId(id))
    }

    /// Wire bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.encode_unsigned();
        bytes.extend_from_slice(&self.signature.0);
        bytes
    }

    /// Strictly decodes an envelope.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != ENVELOPE_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let key_id = KeyId(r.array()?);
        let idem = IdemKey(r.array()?);
        let next_key = match r.u8()? {
            0 => None,
            FLAG_NEXT_KEY => Some(PublicKey(r.array()?)),
            _ => return Err(DecodeError::Invalid("envelope flags")),
        };
        let ciphertext = r.bytes(MAX_ENTRY)?.to_vec();
        let signature = Signature(r.array()?);
        r.finish()?;
        Ok(Envelope { key_id, idem, next_key, ciphertext, signature })
    }
}
