//! Sealing MLS messages into log envelopes and opening them again.
//!
//! The envelope's ciphertext is `nonce [12] · ChaCha20-Poly1305(envelope_key, mls message)`
//! with the log id, idempotency key and key id as associated data, so an envelope cannot be
//! moved to another log or re-labelled. The envelope is signed by the epoch's append key. A
//! server or relay sees neither the MLS message nor anything in its header (group id, epoch,
//! content type).

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use postern_proto::envelope::Envelope;
use postern_proto::ids::{IdemKey, KeyId, LogId, PublicKey};
use rand::RngCore;

use crate::mls::{EpochKeys, MlsError};

const NONCE: usize = 12;
const KEY_PACKAGE_AAD: &[u8] = b"postern/v1/key-package";

/// `nonce [12] · ChaCha20-Poly1305(key, msg, aad)` with a random nonce.
fn seal_aead(key: &[u8; 32], aad: &[u8], msg: &[u8]) -> Result<Vec<u8>, MlsError> {
    let mut nonce = [0u8; NONCE];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let sealed = ChaCha20Poly1305::new(key.into())
        .encrypt(Nonce::from_slice(&nonce), Payload { msg, aad })
        .map_err(|_| MlsError::Library("AEAD encryption".into()))?;
    Ok([&nonce[..], &sealed].concat())
}

/// Opens what [`seal_aead`] made; any failure is [`MlsError::Invalid`].
fn open_aead(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, MlsError> {
    if sealed.len() < NONCE {
        return Err(MlsError::Invalid);
    }
    let (nonce, ct) = sealed.split_at(NONCE);
    ChaCha20Poly1305::new(key.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
        .map_err(|_| MlsError::Invalid)
}

fn aad(log: &LogId, idem: &IdemKey, key_id: &KeyId) -> Vec<u8> {
    [&b"postern/v1/envelope-aead\0"[..], &log.0, &idem.0, &key_id.0].concat()
}

/// Seals an MLS message with an epoch's keys for the chat's log. `next_key` is the next
/// epoch's append key when the message is a commit.
pub fn seal(
    keys: &EpochKeys,
    log: &LogId,
    idem: IdemKey,
    next_key: Option<PublicKey>,
    mls_message: &[u8],
) -> Result<Vec<u8>, MlsError> {
    let aad = aad(log, &idem, &keys.append_public().key_id());
    let ciphertext = seal_aead(&keys.envelope_key, &aad, mls_message)?;
    Ok(Envelope::seal(log, &keys.append_key, idem, next_key, ciphertext).encode())
}

/// Opens an envelope sealed with `keys` (the epoch its key id names): checks the append
/// key's signature, then decrypts. Every failure is the same [`MlsError::Invalid`]; members
/// skip such entries.
pub fn open(keys: &EpochKeys, log: &LogId, env: &Envelope) -> Result<Vec<u8>, MlsError> {
    if !env.verify(log, &keys.append_public()) {
        return Err(MlsError::Invalid);
    }
    open_aead(&keys.envelope_key, &aad(log, &env.idem, &env.key_id), &env.ciphertext)
}

/// Encrypts a key package for the server: `nonce [12] · ChaCha20-Poly1305(kp_key, package)`.
/// Only holders of an invite (which carries `kp_key`) can read what they claim.
pub fn seal_key_package(kp_key: &[u8; 32], package: &[u8]) -> Result<Vec<u8>, MlsError> {
    seal_aead(kp_key, KEY_PACKAGE_AAD, package)
}

/// Decrypts a claimed key package.
pub fn open_key_package(kp_key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, MlsError> {
    open_aead(kp_key, KEY_PACKAGE_AAD, sealed)
}
