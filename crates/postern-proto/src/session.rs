//! The end-to-end session between a client and the server's static key: Noise NK
//! (`Noise_NK_25519_ChaChaPoly_BLAKE2s`), whose transport messages carry padded frames.
//!
//! 1. The client sends handshake message 1 (`e, es`) with a [`ClientHello`] payload.
//! 2. The server answers with message 2 (`e, ee`) carrying a [`ServerHello`]: the chosen
//!    version (0 = none in common) and the per-connection nonce that signed requests bind.
//! 3. Each later message is one padded frame ([`crate::pad`]) sealed by the transport.
//!
//! Whatever carries the messages (a WebSocket, HTTP/2 bodies, a relay) sees only the
//! bucket-sized ciphertexts. A relay in the path cannot read or forge frames.

use crate::codec::{Reader, Writer};
use crate::limits::MAX_FRAME;
use crate::{DecodeError, VERSION, pad};

const PARAMS: &str = "Noise_NK_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"postern/v1/session";
const TAG: usize = 16;
/// Largest session message on the wire: a full bucket plus the AEAD tag.
pub const MAX_MESSAGE: usize = MAX_FRAME + TAG;
const MAX_HANDSHAKE: usize = 256;

/// Why a session step failed. Decryption failures are one variant, never an oracle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The message did not decrypt or authenticate.
    #[error("message did not decrypt")]
    Decrypt,
    /// The decrypted payload is not a valid frame or hello.
    #[error("malformed payload: {0}")]
    Payload(#[from] DecodeError),
    /// The frame is too large to send in one message.
    #[error("frame too large")]
    TooLarge,
    /// The server and client share no protocol version.
    #[error("no protocol version in common")]
    NoCommonVersion,
    /// A bug in this crate or the Noise library, never the peer's fault.
    #[error("internal error: {0}")]
    Internal(&'static str),
}

fn builder() -> Result<snow::Builder<'static>, SessionError> {
    let params = PARAMS.parse().map_err(|_| SessionError::Internal("noise params"))?;
    Ok(snow::Builder::new(params))
}

/// A static X25519 key pair for the server.
#[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct StaticKeypair {
    /// Private key; keep it in the data directory, readable by the server only.
    pub private: [u8; 32],
    /// Public key; goes into the server link.
    pub public: [u8; 32],
}

impl std::fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StaticKeypair(<redacted>)")
    }
}

impl StaticKeypair {
    /// Generates a fresh key pair from the operating system's randomness.
    pub fn generate() -> Result<Self, SessionError> {
        let kp = builder()?.generate_keypair().map_err(|_| SessionError::Internal("keygen"))?;
        Ok(StaticKeypair {
            private: kp.private.try_into().map_err(|_| SessionError::Internal("key size"))?,
            public: kp.public.try_into().map_err(|_| SessionError::Internal("key size"))?,
        })
    }

    /// Rebuilds the key pair from a stored private key.
    pub fn from_private(private: [u8; 32]) -> Self {
        // X25519 public key = scalar multiplication of the base point; snow exposes it only
        // through a handshake, so derive it with the same primitive snow uses.
        let public = x25519_public(&private);
        StaticKeypair { private, public }
    }
}

fn x25519_public(private: &[u8; 32]) -> [u8; 32] {
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut out = [0u8; 32];
    if let Some(mut dh) = DefaultResolver.resolve_dh(&snow::params::DHChoice::Curve25519) {
        dh.set(private);
        out.copy_from_slice(dh.pubkey());
    }
    out
}

/// The client's hello: the versions it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// Protocol versions, most preferred first.
    pub versions: Vec<u8>,
}

/// The server's hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHello {
    /// The version chosen, or 0 when none is in common (the server then closes).
    pub version: u8,
    /// This connection's nonce; signed requests cover it.
    pub nonce: [u8; 32],
}

impl ClientHello {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(u8::try_from(self.versions.len()).unwrap_or(u8::MAX)).fixed(&self.versions);
        w.finish()
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let n = usize::from(r.u8()?);
        if n == 0 || n > 16 || r.remaining() != n {
            return Err(DecodeError::Invalid("client hello"));
        }
        let versions = (0..n).map(|_| r.u8()).collect::<Result<_, _>>()?;
        r.finish()?;
        Ok(ClientHello { versions })
    }
}

impl ServerHello {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(self.version).fixed(&self.nonce);
        w.finish()
    }

    fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let hello = ServerHello { version: r.u8()?, nonce: r.array()? };
        r.finish()?;
        Ok(hello)
    }
}

/// A client session waiting for the server's handshake message.
pub struct ClientHandshake {
    state: snow::HandshakeState,
}

impl std::fmt::Debug for ClientHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientHandshake")
    }
}

impl ClientHandshake {
    /// Starts a session to `server_static`; returns the first message to send.
    pub fn start(server_static: &[u8; 32]) -> Result<(Self, Vec<u8>), SessionError> {
        let mut state = builder()?
            .remote_public_key(server_static)
            .prologue(PROLOGUE)
            .build_initiator()
            .map_err(|_| SessionError::Internal("build initiator"))?;
        let hello = ClientHello { versions: vec![VERSION] }.encode();
        let mut buf = vec![0u8; MAX_HANDSHAKE];
        let n = state
            .write_message(&hello, &mut buf)
            .map_err(|_| SessionError::Internal("write handshake"))?;
        buf.truncate(n);
        Ok((ClientHandshake { state }, buf))
    }

    /// Reads the server's answer and enters transport mode.
    pub fn finish(mut self, message: &[u8]) -> Result<(Transport, ServerHello), SessionError> {
        if message.len() > MAX_HANDSHAKE {
            return Err(SessionError::Decrypt);
        }
        let mut buf = vec![0u8; MAX_HANDSHAKE];
        let n = self.state.read_message(message, &mut buf).map_err(|_| SessionError::Decrypt)?;
        let hello = ServerHello::decode(&buf[..n])?;
        if hello.version != VERSION {
            return Err(SessionError::NoCommonVersion);
        }
        let state =
            self.state.into_transport_mode().map_err(|_| SessionError::Internal("transport"))?;
        Ok((Transport { state }, hello))
    }
}

/// The server side of a handshake: reads message 1, answers with message 2.
///
/// Returns the transport (or `None` when no version is in common: send the answer, then
/// close), the answer to send, and the client's hello.
pub fn server_respond(
    keypair: &StaticKeypair,
    message: &[u8],
    nonce: [u8; 32],
) -> Result<(Option<Transport>, Vec<u8>), SessionError> {
    if message.len() > MAX_HANDSHAKE {
        return Err(SessionError::Decrypt);
    }
    let mut state = builder()?
        .local_private_key(&keypair.private)
        .prologue(PROLOGUE)
        .build_responder()
        .map_err(|_| SessionError::Internal("build responder"))?;
    let mut buf = vec![0u8; MAX_HANDSHAKE];
    let n = state.read_message(message, &mut buf).map_err(|_| SessionError::Decrypt)?;
    let hello = ClientHello::decode(&buf[..n])?;
    let version = if hello.versions.contains(&VERSION) { VERSION } else { 0 };
    let answer = ServerHello { version, nonce }.encode();
    let n = state
        .write_message(&answer, &mut buf)
        .map_err(|_| SessionError::Internal("write handshake"))?;
    buf.truncate(n);
    if version == 0 {
        return Ok((None, buf));
    }
    let state = state.into_transport_mode().map_err(|_| SessionError::Internal("transport"))?;
    Ok((Some(Transport { state }), buf))
}

/// An established session: seals and opens padded frames.
pub struct Transport {
    state: snow::TransportState,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Transport")
    }
}

impl Transport {
    /// Pads and encrypts one frame.
    pub fn seal(&mut self, frame: &[u8]) -> Result<Vec<u8>, SessionError> {
        let padded = pad::pad(frame).ok_or(SessionError::TooLarge)?;
        let mut out = vec![0u8; padded.len() + TAG];
        let n = self
            .state
            .write_message(&padded, &mut out)
            .map_err(|_| SessionError::Internal("seal"))?;
        out.truncate(n);
        Ok(out)
    }

    /// Decrypts one message and strips its padding, returning the frame.
    pub fn open(&mut self, message: &[u8]) -> Result<Vec<u8>, SessionError> {
        if message.len() > MAX_MESSAGE || message.len() < TAG {
            return Err(SessionError::Decrypt);
        }
        let mut buf = vec![0u8; message.len()];
        let n = self.state.read_message(message, &mut buf).map_err(|_| SessionError::Decrypt)?;
        Ok(pad::unpad(&buf[..n])?.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_and_frames_both_ways() {
        let server = StaticKeypair::generate().unwrap();
        assert_eq!(StaticKeypair::from_private(server.private).public, server.public);
        let (client, m1) = ClientHandshake::start(&server.public).unwrap();
        let (st, m2) = server_respond(&server, &m1, [5; 32]).unwrap();
        let mut st = st.unwrap();
        let (mut ct, hello) = client.finish(&m2).unwrap();
        assert_eq!(hello, ServerHello { version: VERSION, nonce: [5; 32] });

        let sealed = ct.seal(b"hello server").unwrap();
        assert_eq!(sealed.len(), 256 + TAG, "padded to the smallest bucket");
        assert_eq!(st.open(&sealed).unwrap(), b"hello server");
        let sealed = st.seal(&[1; 5000]).unwrap();
        assert_eq!(sealed.len(), MAX_FRAME + TAG);
        assert_eq!(ct.open(&sealed).unwrap(), vec![1; 5000]);
    }

    #[test]
    fn wrong_server_key_fails_to_decrypt() {
        let server = StaticKeypair::generate().unwrap();
        let other = StaticKeypair::generate().unwrap();
        let (_client, m1) = ClientHandshake::start(&other.public).unwrap();
        assert!(matches!(server_respond(&server, &m1, [0; 32]), Err(SessionError::Decrypt)));
    }

    #[test]
    fn tampered_message_fails() {
        let server = StaticKeypair::generate().unwrap();
        let (client, m1) = ClientHandshake::start(&server.public).unwrap();
        let (st, m2) = server_respond(&server, &m1, [0; 32]).unwrap();
        let (mut ct, _) = client.finish(&m2).unwrap();
        let mut st = st.unwrap();
        let mut sealed = ct.seal(b"x").unwrap();
        sealed[10] ^= 1;
        assert!(matches!(st.open(&sealed), Err(SessionError::Decrypt)));
    }
}
