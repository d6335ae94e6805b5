//! The server's long-lived secrets in its data directory: the TLS key and certificate, the
//! static Noise key and the gate's access secret (a relay's: the TLS pair and its relay key).
//! Created on first start, readable only by the server's user, and reused afterwards.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use postern_proto::gate::AccessSecret;
use postern_proto::link::ServerLink;
use postern_proto::session::StaticKeypair;
use rand::RngCore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::ServerError;

const TLS_KEY: &str = "tls-key.pem";
const TLS_CERT: &str = "tls-cert.pem";
const STATIC_KEY: &str = "static.key";
const ACCESS_SECRET: &str = "access.secret";
/// The default name in a self-signed certificate: bland on purpose.
const DEFAULT_CERT_NAME: &str = "localhost";

/// What the server proves itself with.
pub(crate) struct Identity {
    pub(crate) tls: TlsIdentity,
    pub(crate) static_key: StaticKeypair,
    pub(crate) secret: AccessSecret,
}

/// The TLS certificate chain and key, and the pin of the key.
pub(crate) struct TlsIdentity {
    pub(crate) certs: Vec<CertificateDer<'static>>,
    pub(crate) key: PrivateKeyDer<'static>,
    pub(crate) pin: [u8; 32],
}

fn io_err(path: &Path, e: std::io::Error) -> ServerError {
    ServerError::DataDir(format!("{}: {e}", path.display()))
}

/// Writes a file readable only by its owner, atomically (temporary file, then rename).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ServerError> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(|e| io_err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn read_or_create(
    path: &Path,
    create: impl FnOnce() -> Result<Vec<u8>, ServerError>,
) -> Result<Vec<u8>, ServerError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes = create()?;
            write_private(path, &bytes)?;
            Ok(bytes)
        }
        Err(e) => Err(io_err(path, e)),
    }
}

fn random32() -> Vec<u8> {
    let mut b = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b
}

fn array32(path: &Path, bytes: Vec<u8>) -> Result<[u8; 32], ServerError> {
    bytes
        .try_into()
        .map_err(|_| ServerError::DataDir(format!("{}: expected 32 bytes", path.display())))
}

/// SHA-256 of the certificate's SubjectPublicKeyInfo: the pin clients check.
pub(crate) fn spki_pin(cert: &CertificateDer<'_>) -> Result<[u8; 32], ServerError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| ServerError::Tls(format!("cannot parse certificate: {e}")))?;
    Ok(postern_proto::link::spki_pin(parsed.tbs_certificate.subject_pki.raw))
}

fn load_pem(
    cert_path: &Path,
    key_path: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), ServerError> {
    let cert_pem = std::fs::read(cert_path).map_err(|e| io_err(cert_path, e))?;
    let key_pem = std::fs::read(key_path).map_err(|e| io_err(key_path, e))?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServerError::Tls(format!("{}: {e}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(ServerError::Tls(format!("{}: no certificate", cert_path.display())));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| ServerError::Tls(format!("{}: {e}", key_path.display())))?
        .ok_or_else(|| ServerError::Tls(format!("{}: no private key", key_path.display())))?;
    Ok((certs, key))
}

/// The 32-byte secret in `dir/file`, created at random if missing.
pub(crate) fn load_secret(dir: &Path, file: &str) -> Result<AccessSecret, ServerError> {
    let path = dir.join(file);
    let secret = read_or_create(&path, || Ok(random32()))?;
    Ok(AccessSecret(array32(&path, secret)?))
}

impl Identity {
    /// Loads the identity from `dir`, creating what is missing.
    pub(crate) fn load_or_create(
        dir: &Path,
        cert_name: Option<&str>,
        operator_tls: (Option<&Path>, Option<&Path>),
    ) -> Result<Self, ServerError> {
        let tls = TlsIdentity::load_or_create(dir, cert_name, operator_tls)?;
        let static_path = dir.join(STATIC_KEY);
        let static_private = read_or_create(&static_path, || {
            let kp = StaticKeypair::generate().map_err(|e| ServerError::Tls(e.to_string()))?;
            Ok(kp.private.to_vec())
        })?;
        let static_key = StaticKeypair::from_private(array32(&static_path, static_private)?);
        let secret = load_secret(dir, ACCESS_SECRET)?;
        Ok(Identity { tls, static_key, secret })
    }

    /// The server link for these addresses.
    pub(crate) fn link(&self, addrs: Vec<String>, server_name: Option<String>) -> ServerLink {
        ServerLink {
            addrs,
            server_name,
            pins: vec![self.tls.pin],
            static_key: self.static_key.public,
            secret: self.secret.clone(),
        }
    }
}

impl TlsIdentity {
    /// Loads the operator's certificate chain and key (both given, or neither), or else the
    /// self-signed pair in `dir` (created if missing).
    pub(crate) fn load_or_create(
        dir: &Path,
        cert_name: Option<&str>,
        operator_tls: (Option<&Path>, Option<&Path>),
    ) -> Result<Self, ServerError> {
        let operator_tls = match operator_tls {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(ServerError::Tls("give both tls_cert and tls_key, or neither".into())),
        };
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let (certs, key) = match operator_tls {
            Some((cert, key)) => load_pem(cert, key)?,
            None => {
                let (cert_path, key_path) = (dir.join(TLS_CERT), dir.join(TLS_KEY));
                if !cert_path.exists() || !key_path.exists() {
                    let name = cert_name.unwrap_or(DEFAULT_CERT_NAME).to_owned();
                    let key = rcgen::KeyPair::generate()
                        .map_err(|e| ServerError::Tls(format!("key generation: {e}")))?;
                    let cert = rcgen::CertificateParams::new(vec![name])
                        .and_then(|p| p.self_signed(&key))
                        .map_err(|e| ServerError::Tls(format!("self-signed certificate: {e}")))?;
                    write_private(&key_path, key.serialize_pem().as_bytes())?;
                    write_private(&cert_path, cert.pem().as_bytes())?;
                }
                load_pem(&cert_path, &key_path)?
            }
        };
        let pin = spki_pin(&certs[0])?;
        Ok(TlsIdentity { certs, key, pin })
    }

    /// The TLS configuration: TLS 1.3 and 1.2, ALPN for HTTP/2 and HTTP/1.1, like a web server.
    ///
    /// It chooses as nginx with OpenSSL 3.0 and Debian's settings does (`ssl_ciphers
    /// HIGH:!aNULL:!MD5`, `ssl_prefer_server_ciphers on`): OpenSSL's cipher suite order, the
    /// server's preference, two TLS 1.3 tickets and TLS 1.2 tickets, each valid for five
    /// minutes (`ssl_session_timeout`).
    pub(crate) fn tls_config(&self) -> Result<Arc<rustls::ServerConfig>, ServerError> {
        use rustls::crypto::ring::cipher_suite as cs;
        let tls = |e: rustls::Error| ServerError::Tls(e.to_string());
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![
                cs::TLS13_AES_256_GCM_SHA384,
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS13_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ],
            ..rustls::crypto::ring::default_provider()
        };
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_no_client_auth()
            .with_single_cert(self.certs.clone(), self.key.clone_key())
            .map_err(tls)?;
        // nginx's list (with `http2` on the listener), in its order of preference.
        config.alpn_protocols =
            [&b"h2"[..], b"http/1.1", b"http/1.0", b"http/0.9"].map(<[u8]>::to_vec).to_vec();
        config.ignore_client_order = true;
        config.ticketer = Arc::new(Tickets(rustls::crypto::ring::Ticketer::new().map_err(tls)?));
        Ok(Arc::new(config))
    }
}

/// How long a session ticket is valid: nginx's default `ssl_session_timeout`, which OpenSSL
/// sends as the tickets' lifetime hint.
const TICKET_LIFETIME: u32 = 300;

/// rustls' rotating ticket keys, announcing nginx's ticket lifetime.
#[derive(Debug)]
struct Tickets(Arc<dyn rustls::server::ProducesTickets>);

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        self.0.enabled()
    }

    fn lifetime(&self) -> u32 {
        TICKET_LIFETIME
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.0.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.0.decrypt(cipher)
    }
}
