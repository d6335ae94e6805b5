//! The device credential: a user's identity key vouching for one device's key. It travels
//! as the basic credential of the device's MLS leaf, so every group member decodes it from
//! bytes another member chose, and checks it.
//!
//! ```text
//! device_key [32] · identity_key [32] · Ed25519 signature [64] by identity_key over
//!   "postern/v1/device-credential\0" · device_key
//! ```

use ed25519_dalek::Verifier;

use crate::ids::PublicKey;

const CREDENTIAL_CONTEXT: &[u8] = b"postern/v1/device-credential\0";

/// A device's credential: the identity vouches for the device key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceCredential {
    /// The device's signature key.
    pub device_key: PublicKey,
    /// The user's identity key.
    pub identity_key: PublicKey,
    /// The identity key's signature over the device key.
    pub signature: [u8; 64],
}

impl DeviceCredential {
    /// What the identity key signs.
    pub fn signing_input(device_key: &PublicKey) -> Vec<u8> {
        [CREDENTIAL_CONTEXT, &device_key.0].concat()
    }

    /// Wire form: device key, identity key, signature (128 bytes).
    pub fn encode(&self) -> Vec<u8> {
        [&self.device_key.0[..], &self.identity_key.0, &self.signature].concat()
    }

    /// Parses the wire form; `None` unless exactly 128 bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 128 {
            return None;
        }
        Some(DeviceCredential {
            device_key: PublicKey(bytes[..32].try_into().ok()?),
            identity_key: PublicKey(bytes[32..64].try_into().ok()?),
            signature: bytes[64..].try_into().ok()?,
        })
    }

    /// Whether the identity key really signed the device key.
    pub fn verify(&self) -> bool {
        let Ok(identity) = ed25519_dalek::VerifyingKey::from_bytes(&self.identity_key.0) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&self.signature);
        identity.verify(&Self::signing_input(&self.device_key), &sig).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};
    use proptest::prelude::any;

    #[test]
    fn a_signed_credential_round_trips_and_verifies_and_a_forged_one_does_not() {
        let identity = SigningKey::from_bytes(&[1; 32]);
        let device_key = PublicKey([2; 32]);
        let signature = identity.sign(&DeviceCredential::signing_input(&device_key)).to_bytes();
        let cred = DeviceCredential {
            device_key,
            identity_key: PublicKey(identity.verifying_key().to_bytes()),
            signature,
        };
        let back = DeviceCredential::decode(&cred.encode()).unwrap();
        assert_eq!(back, cred);
        assert!(back.verify());
        let forged = DeviceCredential { device_key: PublicKey([3; 32]), ..cred.clone() };
        assert!(!forged.verify());
        assert_eq!(DeviceCredential::decode(&cred.encode()[..127]), None);
    }

    proptest::proptest! {
        #[test]
        fn any_credential_round_trips(device in any::<[u8; 32]>(), identity in any::<[u8; 32]>(), sig in any::<[u8; 32]>(), sig2 in any::<[u8; 32]>()) {
            let mut signature = [0; 64];
            signature[..32].copy_from_slice(&sig);
            signature[32..].copy_from_slice(&sig2);
            let cred = DeviceCredential { device_key: PublicKey(device), identity_key: PublicKey(identity), signature };
            proptest::prop_assert_eq!(DeviceCredential::decode(&cred.encode()), Some(cred));
        }
    }
}
