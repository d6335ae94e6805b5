//! Identity and device keys, the device credential, and the safety number.
//!
//! A user has one Ed25519 identity key; its fingerprint is the safety number people compare.
//! Each device has its own Ed25519 key, which is its MLS signature key, and a credential
//! binding it to the identity: `(device key, identity key, identity signature)`. Every group
//! member checks the credential as part of validity, so a server cannot slip in a device.

use ed25519_dalek::{Signer, SigningKey, Verifier};
use postern_proto::ids::PublicKey;
use rand::RngCore;
use sha2::{Digest, Sha512};

const CREDENTIAL_CONTEXT: &[u8] = b"postern/v1/device-credential\0";

/// A user's identity and this device's keys.
#[derive(Clone)]
pub struct Identity {
    /// Display name chosen at `init`; travels only inside MLS.
    pub name: String,
    pub(crate) identity_key: SigningKey,
    pub(crate) device_key: SigningKey,
    pub(crate) device_id: [u8; 16],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("name", &self.name).finish_non_exhaustive()
    }
}

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
    fn signing_input(device_key: &PublicKey) -> Vec<u8> {
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

impl Identity {
    /// A new identity and device.
    pub fn generate(name: &str) -> Self {
        let mut rng = rand::rngs::OsRng;
        let mut device_id = [0u8; 16];
        rng.fill_bytes(&mut device_id);
        Identity {
            name: name.to_owned(),
            identity_key: SigningKey::generate(&mut rng),
            device_key: SigningKey::generate(&mut rng),
            device_id,
        }
    }

    /// The identity's public key.
    pub fn identity_public(&self) -> PublicKey {
        PublicKey(self.identity_key.verifying_key().to_bytes())
    }

    /// This device's credential.
    pub fn credential(&self) -> DeviceCredential {
        let device_key = PublicKey(self.device_key.verifying_key().to_bytes());
        let signature =
            self.identity_key.sign(&DeviceCredential::signing_input(&device_key)).to_bytes();
        DeviceCredential { device_key, identity_key: self.identity_public(), signature }
    }

    /// The safety number.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.identity_public())
    }

    /// This device's id in hex.
    pub fn device_id_hex(&self) -> String {
        self.device_id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The safety number of an identity key: 60 digits in 12 groups of 5, from
/// `SHA-512("postern/v1/fingerprint\0" · key)`, each group a 40-bit big-endian chunk mod 10^5.
pub fn fingerprint(identity: &PublicKey) -> String {
    let digest =
        Sha512::new().chain_update(b"postern/v1/fingerprint\0").chain_update(identity.0).finalize();
    digest[..60]
        .chunks(5)
        .map(|c| {
            let v = c.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            format!("{:05}", v % 100_000)
        })
        .collect::<Vec<_>>()
        .join(" ")
}
