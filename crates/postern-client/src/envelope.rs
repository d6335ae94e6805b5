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
use postern_proto::ids::{IdemKey, KeyId, PublicKey};
use rand::RngCore;

use crate::mls::{EpochKeys, MlsError};

const NONCE: usize = 12;

fn aad(keys: &EpochKeys, idem: &IdemKey, key_id: &KeyId) -> Vec<u8> {
    [&b"postern/v1/envelope-aead\0"[..], &keys.log_id.0, &idem.0, &key_id.0].concat()
}

/// Seals an MLS message for the epoch's log. `next_key` is the next epoch's append key when
/// the message is a commit.
pub fn seal(
    keys: &EpochKeys,
    idem: IdemKey,
    next_key: Option<PublicKey>,
    mls_message: &[u8],
) -> Result<Vec<u8>, MlsError> {
    let mut nonce = [0u8; NONCE];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let aad = aad(keys, &idem, &keys.append_public().key_id());
    let cipher = ChaCha20Poly1305::new(&keys.envelope_key.into());
    let sealed = cipher
        .encrypt(Nonce::from_slice(&nonce), Payload { msg: mls_message, aad: &aad })
        .map_err(|_| MlsError::Library("envelope encryption".into()))?;
    let ciphertext = [&nonce[..], &sealed].concat();
    Ok(Envelope::seal(&keys.log_id, &keys.append_key, idem, next_key, ciphertext).encode())
}

/// Opens an envelope of this epoch: checks the append key's signature, then decrypts.
/// Every failure is the same [`MlsError::Invalid`]; members skip such entries.
pub fn open(keys: &EpochKeys, bytes: &[u8]) -> Result<(Envelope, Vec<u8>), MlsError> {
    let env = Envelope::decode(bytes).map_err(|_| MlsError::Invalid)?;
    if !env.verify(&keys.log_id, &keys.append_public()) || env.ciphertext.len() < NONCE {
        return Err(MlsError::Invalid);
    }
    let (nonce, sealed) = env.ciphertext.split_at(NONCE);
    let cipher = ChaCha20Poly1305::new(&keys.envelope_key.into());
    let plain = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload { msg: sealed, aad: &aad(keys, &env.idem, &env.key_id) },
        )
        .map_err(|_| MlsError::Invalid)?;
    Ok((env, plain))
}

/// Encrypts a key package for the server: `nonce [12] · ChaCha20-Poly1305(kp_key, package)`.
/// Only holders of an invite (which carries `kp_key`) can read what they claim.
pub fn seal_key_package(kp_key: &[u8; 32], package: &[u8]) -> Result<Vec<u8>, MlsError> {
    let mut nonce = [0u8; NONCE];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let sealed = ChaCha20Poly1305::new(kp_key.into())
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload { msg: package, aad: b"postern/v1/key-package" },
        )
        .map_err(|_| MlsError::Library("key package encryption".into()))?;
    Ok([&nonce[..], &sealed].concat())
}

/// Decrypts a claimed key package.
pub fn open_key_package(kp_key: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, MlsError> {
    if sealed.len() < NONCE {
        return Err(MlsError::Invalid);
    }
    let (nonce, ct) = sealed.split_at(NONCE);
    ChaCha20Poly1305::new(kp_key.into())
        .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: b"postern/v1/key-package" })
        .map_err(|_| MlsError::Invalid)
}
