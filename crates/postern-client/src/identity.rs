//! Identity and device keys, the device credential, and the safety number.
//!
//! A user has one Ed25519 identity key; its fingerprint is the safety number people compare.
//! Each device has its own Ed25519 key, which is its MLS signature key, and a credential
//! binding it to the identity: `(device key, identity key, identity signature)`. Every group
//! member checks the credential as part of validity, so a server cannot slip in a device.

use ed25519_dalek::{Signer, SigningKey};
pub use postern_proto::credential::DeviceCredential;
use postern_proto::ids::PublicKey;
use rand::RngCore;
use sha2::{Digest, Sha512};

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

    /// The tag a network is stored under: 8 bytes in hex of HKDF-SHA-256 keyed with this
    /// device's secret over the network's description, so the store names no access point
    /// and tags differ between devices.
    pub(crate) fn network_tag(&self, description: &str) -> String {
        let key = zeroize::Zeroizing::new(self.device_key.to_bytes());
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(b"postern/v1/network\0"), &*key);
        let mut tag = [0u8; 8];
        // 8 bytes is far below HKDF-SHA-256's limit of 8,160.
        if hk.expand(description.as_bytes(), &mut tag).is_err() {
            return String::new();
        }
        tag.iter().map(|b| format!("{b:02x}")).collect()
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
