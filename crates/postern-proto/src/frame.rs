//! Client requests, server responses and server pushes: the plaintext inside a session.
//!
//! A client frame is `version u8 · request_id u32 · op u8 · fields · [signature 64]`. Requests
//! that act for a mailbox owner or create a log end with an Ed25519 signature over
//! [`ClientFrame::signing_input`], which binds the per-connection server nonce, so a signed
//! request cannot be replayed on another connection. Request ids must strictly increase on a
//! connection, so it cannot be replayed on the same one either.
//!
//! Decoding is strict (no trailing bytes, booleans 0 or 1, known tags only), which makes the
//! encoding canonical: `encode(decode(b)) == b` for every `b` that decodes.

use crate::codec::{Reader, Writer};
use crate::ids::{
    ClaimToken, DeviceId, DropId, IdemKey, LogId, MailboxId, PublicKey, Signature, TokenHash,
    UploadId,
};
use crate::limits::{
    MAX_DEVICES, MAX_FRAME, MAX_INLINE, MAX_ITEMS, MAX_KEY_PACKAGE, MAX_KEY_PACKAGES_PER_UPLOAD,
};
use crate::{DecodeError, VERSION};

/// The body of an append or a drop: inline, or a completed chunked upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// The bytes themselves, at most [`MAX_INLINE`].
    Inline(Vec<u8>),
    /// A chunked upload whose bytes have all been received.
    Upload(UploadId),
}

/// How often a claim token may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimPolicy {
    /// One claim, then the token is gone (one-time invites).
    Once,
    /// At most this many claims per day (long-lived addresses).
    Daily(u16),
}

/// A request from client to server. See `docs/protocol.md` for each operation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Request {
    /// Liveness check; answered with [`Response::Pong`].
    Ping,
    /// Create a mailbox owned by `owner_key` (signed by that key).
    MailboxCreate { mailbox: MailboxId, owner_key: PublicKey },
    /// Add a drop address to a mailbox (owner-signed).
    DropCreate { mailbox: MailboxId, drop: DropId },
    /// Remove a drop address and everything dropped through it that is unread (owner-signed).
    DropRevoke { mailbox: MailboxId, drop: DropId },
    /// Drop a sealed item through a drop address (no signature: the address is the capability).
    Drop { drop: DropId, idem: IdemKey, body: Body },
    /// Items after `after`, oldest first, carrying at most `max_bytes` item bytes
    /// (owner-signed).
    MailboxFetch { mailbox: MailboxId, after: u64, max_items: u16, max_bytes: u16 },
    /// At most `max_bytes` more of a large mailbox item from `offset` (owner-signed).
    MailboxReadPart { mailbox: MailboxId, seq: u64, offset: u32, max_bytes: u16 },
    /// Delete items up to and including `through` (owner-signed).
    MailboxDelete { mailbox: MailboxId, through: u64 },
    /// Add encrypted key packages to a device's pool (owner-signed).
    KeyPackageUpload {
        mailbox: MailboxId,
        device: DeviceId,
        last_resort: bool,
        packages: Vec<Vec<u8>>,
    },
    /// How many key packages each device has left (owner-signed).
    KeyPackageStatus { mailbox: MailboxId },
    /// Register a claim token by its hash (owner-signed).
    ClaimTokenCreate {
        mailbox: MailboxId,
        token_hash: TokenHash,
        policy: ClaimPolicy,
        expires_day: u32,
    },
    /// Revoke a claim token (owner-signed).
    ClaimTokenRevoke { mailbox: MailboxId, token_hash: TokenHash },
    /// Claim one key package per device of the mailbox the token belongs to.
    KeyPackageClaim { token: ClaimToken },
    /// Create a log whose first append key is `key` (signed by that key).
    LogCreate { log: LogId, key: PublicKey },
    /// Append an envelope ([`crate::envelope::Envelope`]) to a log.
    LogAppend { log: LogId, body: Body },
    /// Prove holding one of the log's append keys for the rest of this connection (signed by
    /// that key): the server then takes this connection's appends under it without checking
    /// each envelope's signature.
    LogAuth { log: LogId, key: PublicKey },
    /// Entries after `after`, oldest first, carrying at most `max_bytes` entry bytes.
    LogRead { log: LogId, after: u64, max_items: u16, max_bytes: u16 },
    /// At most `max_bytes` more of a large entry from `offset`.
    LogReadPart { log: LogId, seq: u64, offset: u32, max_bytes: u16 },
    /// Push entries after `after`, then every new one, until unsubscribed; a push carries at
    /// most `max_bytes` entry bytes.
    Subscribe { log: LogId, after: u64, max_bytes: u16 },
    /// Stop pushing a log's entries.
    Unsubscribe { log: LogId },
    /// One chunk of a resumable upload of `total_len` bytes.
    UploadChunk { upload: UploadId, total_len: u32, offset: u32, bytes: Vec<u8> },
}

mod op {
    pub(super) const PING: u8 = 0;
    pub(super) const MAILBOX_CREATE: u8 = 1;
    pub(super) const DROP_CREATE: u8 = 2;
    pub(super) const DROP_REVOKE: u8 = 3;
    pub(super) const DROP: u8 = 4;
    pub(super) const MAILBOX_FETCH: u8 = 5;
    pub(super) const MAILBOX_READ_PART: u8 = 6;
    pub(super) const MAILBOX_DELETE: u8 = 7;
    pub(super) const KEY_PACKAGE_UPLOAD: u8 = 8;
    pub(super) const KEY_PACKAGE_STATUS: u8 = 9;
    pub(super) const CLAIM_TOKEN_CREATE: u8 = 10;
    pub(super) const CLAIM_TOKEN_REVOKE: u8 = 11;
    pub(super) const KEY_PACKAGE_CLAIM: u8 = 12;
    pub(super) const LOG_CREATE: u8 = 13;
    pub(super) const LOG_APPEND: u8 = 14;
    pub(super) const LOG_READ: u8 = 15;
    pub(super) const LOG_READ_PART: u8 = 16;
    pub(super) const SUBSCRIBE: u8 = 17;
    pub(super) const UNSUBSCRIBE: u8 = 18;
    pub(super) const UPLOAD_CHUNK: u8 = 19;
    pub(super) const LOG_AUTH: u8 = 20;
}

impl Request {
    /// Which key must sign this request, if any: the mailbox owner's key (looked up by the
    /// server) or a key carried in the request itself.
    pub fn signer(&self) -> Signer {
        match self {
            Request::MailboxCreate { owner_key, .. } => Signer::Key(*owner_key),
            Request::LogCreate { key, .. } | Request::LogAuth { key, .. } => Signer::Key(*key),
            Request::DropCreate { mailbox, .. }
            | Request::DropRevoke { mailbox, .. }
            | Request::MailboxFetch { mailbox, .. }
            | Request::MailboxReadPart { mailbox, .. }
            | Request::MailboxDelete { mailbox, .. }
            | Request::KeyPackageUpload { mailbox, .. }
            | Request::KeyPackageStatus { mailbox }
            | Request::ClaimTokenCreate { mailbox, .. }
            | Request::ClaimTokenRevoke { mailbox, .. } => Signer::Owner(*mailbox),
            Request::Ping
            | Request::Drop { .. }
            | Request::KeyPackageClaim { .. }
            | Request::LogAppend { .. }
            | Request::LogRead { .. }
            | Request::LogReadPart { .. }
            | Request::Subscribe { .. }
            | Request::Unsubscribe { .. }
            | Request::UploadChunk { .. } => Signer::None,
        }
    }

    /// A short stable name for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::MailboxCreate { .. } => "mailbox_create",
            Request::DropCreate { .. } => "drop_create",
            Request::DropRevoke { .. } => "drop_revoke",
            Request::Drop { .. } => "drop",
            Request::MailboxFetch { .. } => "mailbox_fetch",
            Request::MailboxReadPart { .. } => "mailbox_read_part",
            Request::MailboxDelete { .. } => "mailbox_delete",
            Request::KeyPackageUpload { .. } => "key_package_upload",
            Request::KeyPackageStatus { .. } => "key_package_status",
            Request::ClaimTokenCreate { .. } => "claim_token_create",
            Request::ClaimTokenRevoke { .. } => "claim_token_revoke",
            Request::KeyPackageClaim { .. } => "key_package_claim",
            Request::LogCreate { .. } => "log_create",
            Request::LogAppend { .. } => "log_append",
            Request::LogAuth { .. } => "log_auth",
            Request::LogRead { .. } => "log_read",
            Request::LogReadPart { .. } => "log_read_part",
            Request::Subscribe { .. } => "subscribe",
            Request::Unsubscribe { .. } => "unsubscribe",
            Request::UploadChunk { .. } => "upload_chunk",
        }
    }
}

/// Who must have signed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    /// Unsigned.
    None,
    /// The owner key registered for this mailbox.
    Owner(MailboxId),
    /// This key, carried in the request (proof of possession).
    Key(PublicKey),
}

/// A request with its connection-scoped id and, for signed requests, the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFrame {
    /// Strictly increasing per connection; echoed in the response.
    pub request_id: u32,
    /// The operation.
    pub request: Request,
    /// Present exactly when [`Request::signer`] is not [`Signer::None`].
    pub signature: Option<Signature>,
}

const SIGNING_CONTEXT: &[u8] = b"postern/v1/request\0";

impl ClientFrame {
    /// The bytes a signed request's signature covers: a context string, the server's
    /// per-connection nonce and the encoded frame without its signature.
    pub fn signing_input(&self, server_nonce: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + 128);
        out.extend_from_slice(SIGNING_CONTEXT);
        out.extend_from_slice(server_nonce);
        out.extend_from_slice(&self.encode_unsigned());
        out
    }

    /// Signs the frame in place with `key`.
    pub fn sign(&mut self, key: &ed25519_dalek::SigningKey, server_nonce: &[u8; 32]) {
        self.signature = Some(crate::ids::sign(key, &self.signing_input(server_nonce)));
    }

    fn encode_unsigned(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(VERSION).u32(self.request_id);
        encode_request(&mut w, &self.request);
        w.finish()
    }

    /// Wire bytes (before padding).
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = self.encode_unsigned();
        if let Some(sig) = &self.signature {
            bytes.extend_from_slice(&sig.0);
        }
        bytes
    }

    /// Strictly decodes a frame. A signature is read exactly when the operation needs one.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_FRAME {
            return Err(DecodeError::TooLong);
        }
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let request_id = r.u32()?;
        let request = decode_request(&mut r)?;
        let signature = match request.signer() {
            Signer::None => None,
            Signer::Owner(_) | Signer::Key(_) => Some(Signature(r.array()?)),
        };
        r.finish()?;
        Ok(Self { request_id, request, signature })
    }
}

fn encode_body(w: &mut Writer, body: &Body) {
    match body {
        Body::Inline(bytes) => {
            w.u8(0).bytes(bytes);
        }
        Body::Upload(id) => {
            w.u8(1).fixed(&id.0);
        }
    }
}

fn decode_body(r: &mut Reader<'_>) -> Result<Body, DecodeError> {
    match r.u8()? {
        0 => Ok(Body::Inline(r.bytes(MAX_INLINE)?.to_vec())),
        1 => Ok(Body::Upload(UploadId(r.array()?))),
        _ => Err(DecodeError::Invalid("body tag")),
    }
}

fn encode_request(w: &mut Writer, req: &Request) {
    match req {
        Request::Ping => {
            w.u8(op::PING);
        }
        Request::MailboxCreate { mailbox, owner_key } => {
            w.u8(op::MAILBOX_CREATE).fixed(&mailbox.0).fixed(&owner_key.0);
        }
        Request::DropCreate { mailbox, drop } => {
            w.u8(op::DROP_CREATE).fixed(&mailbox.0).fixed(&drop.0);
        }
        Request::DropRevoke { mailbox, drop } => {
            w.u8(op::DROP_REVOKE).fixed(&mailbox.0).fixed(&drop.0);
        }
        Request::Drop { drop, idem, body } => {
            w.u8(op::DROP).fixed(&drop.0).fixed(&idem.0);
            encode_body(w, body);
        }
        Request::MailboxFetch { mailbox, after, max_items, max_bytes } => {
            w.u8(op::MAILBOX_FETCH).fixed(&mailbox.0).u64(*after).u16(*max_items).u16(*max_bytes);
        }
        Request::MailboxReadPart { mailbox, seq, offset, max_bytes } => {
            w.u8(op::MAILBOX_READ_PART).fixed(&mailbox.0).u64(*seq).u32(*offset).u16(*max_bytes);
        }
        Request::MailboxDelete { mailbox, through } => {
            w.u8(op::MAILBOX_DELETE).fixed(&mailbox.0).u64(*through);
        }
        Request::KeyPackageUpload { mailbox, device, last_resort, packages } => {
            w.u8(op::KEY_PACKAGE_UPLOAD)
                .fixed(&mailbox.0)
                .fixed(&device.0)
                .bool(*last_resort)
                .u8(u8::try_from(packages.len()).unwrap_or(u8::MAX));
            for p in packages {
                w.bytes(p);
            }
        }
        Request::KeyPackageStatus { mailbox } => {
            w.u8(op::KEY_PACKAGE_STATUS).fixed(&mailbox.0);
        }
        Request::ClaimTokenCreate { mailbox, token_hash, policy, expires_day } => {
            w.u8(op::CLAIM_TOKEN_CREATE).fixed(&mailbox.0).fixed(&token_hash.0);
            match policy {
                ClaimPolicy::Once => w.u8(0).u16(0),
                ClaimPolicy::Daily(n) => w.u8(1).u16(*n),
            };
            w.u32(*expires_day);
        }
        Request::ClaimTokenRevoke { mailbox, token_hash } => {
            w.u8(op::CLAIM_TOKEN_REVOKE).fixed(&mailbox.0).fixed(&token_hash.0);
        }
        Request::KeyPackageClaim { token } => {
            w.u8(op::KEY_PACKAGE_CLAIM).fixed(&token.0);
        }
        Request::LogCreate { log, key } => {
            w.u8(op::LOG_CREATE).fixed(&log.0).fixed(&key.0);
        }
        Request::LogAppend { log, body } => {
            w.u8(op::LOG_APPEND).fixed(&log.0);
            encode_body(w, body);
        }
        Request::LogAuth { log, key } => {
            w.u8(op::LOG_AUTH).fixed(&log.0).fixed(&key.0);
        }
        Request::LogRead { log, after, max_items, max_bytes } => {
            w.u8(op::LOG_READ).fixed(&log.0).u64(*after).u16(*max_items).u16(*max_bytes);
        }
        Request::LogReadPart { log, seq, offset, max_bytes } => {
            w.u8(op::LOG_READ_PART).fixed(&log.0).u64(*seq).u32(*offset).u16(*max_bytes);
        }
        Request::Subscribe { log, after, max_bytes } => {
            w.u8(op::SUBSCRIBE).fixed(&log.0).u64(*after).u16(*max_bytes);
        }
        Request::Unsubscribe { log } => {
            w.u8(op::UNSUBSCRIBE).fixed(&log.0);
        }
        Request::UploadChunk { upload, total_len, offset, bytes } => {
            w.u8(op::UPLOAD_CHUNK).fixed(&upload.0).u32(*total_len).u32(*offset).bytes(bytes);
        }
    }
}

fn decode_request(r: &mut Reader<'_>) -> Result<Request, DecodeError> {
    let req = match r.u8()? {
        op::PING => Request::Ping,
        op::MAILBOX_CREATE => Request::MailboxCreate {
            mailbox: MailboxId(r.array()?),
            owner_key: PublicKey(r.array()?),
        },
        op::DROP_CREATE => {
            Request::DropCreate { mailbox: MailboxId(r.array()?), drop: DropId(r.array()?) }
        }
        op::DROP_REVOKE => {
            Request::DropRevoke { mailbox: MailboxId(r.array()?), drop: DropId(r.array()?) }
        }
        op::DROP => Request::Drop {
            drop: DropId(r.array()?),
            idem: IdemKey(r.array()?),
            body: decode_body(r)?,
        },
        op::MAILBOX_FETCH => Request::MailboxFetch {
            mailbox: MailboxId(r.array()?),
            after: r.u64()?,
            max_items: r.u16()?,
            max_bytes: r.u16()?,
        },
        op::MAILBOX_READ_PART => Request::MailboxReadPart {
            mailbox: MailboxId(r.array()?),
            seq: r.u64()?,
            offset: r.u32()?,
            max_bytes: r.u16()?,
        },
        op::MAILBOX_DELETE => {
            Request::MailboxDelete { mailbox: MailboxId(r.array()?), through: r.u64()? }
        }
        op::KEY_PACKAGE_UPLOAD => {
            let mailbox = MailboxId(r.array()?);
            let device = DeviceId(r.array()?);
            let last_resort = r.bool()?;
            let count = usize::from(r.u8()?);
            if count > MAX_KEY_PACKAGES_PER_UPLOAD {
                return Err(DecodeError::TooLong);
            }
            let mut packages = Vec::with_capacity(count);
            for _ in 0..count {
                packages.push(r.bytes(MAX_KEY_PACKAGE)?.to_vec());
            }
            Request::KeyPackageUpload { mailbox, device, last_resort, packages }
        }
        op::KEY_PACKAGE_STATUS => Request::KeyPackageStatus { mailbox: MailboxId(r.array()?) },
        op::CLAIM_TOKEN_CREATE => {
            let mailbox = MailboxId(r.array()?);
            let token_hash = TokenHash(r.array()?);
            let policy = match (r.u8()?, r.u16()?) {
                (0, 0) => ClaimPolicy::Once,
                (1, n) if n > 0 => ClaimPolicy::Daily(n),
                _ => return Err(DecodeError::Invalid("claim policy")),
            };
            Request::ClaimTokenCreate { mailbox, token_hash, policy, expires_day: r.u32()? }
        }
        op::CLAIM_TOKEN_REVOKE => Request::ClaimTokenRevoke {
            mailbox: MailboxId(r.array()?),
            token_hash: TokenHash(r.array()?),
        },
        op::KEY_PACKAGE_CLAIM => Request::KeyPackageClaim { token: ClaimToken(r.array()?) },
        op::LOG_CREATE => Request::LogCreate { log: LogId(r.array()?), key: PublicKey(r.array()?) },
        op::LOG_APPEND => Request::LogAppend { log: LogId(r.array()?), body: decode_body(r)? },
        op::LOG_AUTH => Request::LogAuth { log: LogId(r.array()?), key: PublicKey(r.array()?) },
        op::LOG_READ => Request::LogRead {
            log: LogId(r.array()?),
            after: r.u64()?,
            max_items: r.u16()?,
            max_bytes: r.u16()?,
        },
        op::LOG_READ_PART => Request::LogReadPart {
            log: LogId(r.array()?),
            seq: r.u64()?,
            offset: r.u32()?,
            max_bytes: r.u16()?,
        },
        op::SUBSCRIBE => {
            Request::Subscribe { log: LogId(r.array()?), after: r.u64()?, max_bytes: r.u16()? }
        }
        op::UNSUBSCRIBE => Request::Unsubscribe { log: LogId(r.array()?) },
        op::UPLOAD_CHUNK => Request::UploadChunk {
            upload: UploadId(r.array()?),
            total_len: r.u32()?,
            offset: r.u32()?,
            bytes: r.bytes(MAX_INLINE)?.to_vec(),
        },
        _ => return Err(DecodeError::Invalid("operation")),
    };
    Ok(req)
}

/// Why the server refused a request. The numeric codes are stable across versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The frame could not be decoded. The server closes the connection after sending it.
    BadFrame,
    /// The frame's version is not spoken here. The connection is closed.
    UnsupportedVersion,
    /// The frame exceeds [`MAX_FRAME`]. The connection is closed.
    FrameTooLarge,
    /// No such object, or the request may not use it: the two are deliberately the same.
    NotFound,
    /// The id is taken, or the idempotency key was used before with different content.
    Conflict,
    /// The capability's quota (log, drop address, key-package pool) is full.
    QuotaExceeded,
    /// The server's global disk quota is reached: no new data until space is freed.
    ServerFull,
    /// Too many requests of this kind; retry later.
    RateLimited,
    /// The entry is larger than [`crate::limits::MAX_ENTRY`].
    EntryTooLarge,
    /// Well-formed but inconsistent (upload offset beyond what was received, and similar).
    BadRequest,
    /// The server failed; the request may be retried with the same idempotency key.
    Internal,
}

impl ErrorCode {
    /// The stable numeric code.
    pub fn code(self) -> u8 {
        match self {
            ErrorCode::BadFrame => 1,
            ErrorCode::UnsupportedVersion => 2,
            ErrorCode::FrameTooLarge => 3,
            ErrorCode::NotFound => 4,
            ErrorCode::Conflict => 5,
            ErrorCode::QuotaExceeded => 6,
            ErrorCode::ServerFull => 7,
            ErrorCode::RateLimited => 8,
            ErrorCode::EntryTooLarge => 9,
            ErrorCode::BadRequest => 10,
            ErrorCode::Internal => 11,
        }
    }

    /// The code for a numeric value, if defined.
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => ErrorCode::BadFrame,
            2 => ErrorCode::UnsupportedVersion,
            3 => ErrorCode::FrameTooLarge,
            4 => ErrorCode::NotFound,
            5 => ErrorCode::Conflict,
            6 => ErrorCode::QuotaExceeded,
            7 => ErrorCode::ServerFull,
            8 => ErrorCode::RateLimited,
            9 => ErrorCode::EntryTooLarge,
            10 => ErrorCode::BadRequest,
            11 => ErrorCode::Internal,
            _ => return None,
        })
    }

    /// Whether the server closes the connection after this error.
    pub fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorCode::BadFrame | ErrorCode::UnsupportedVersion | ErrorCode::FrameTooLarge
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::ServerFull => "server_full",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::EntryTooLarge => "entry_too_large",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Internal => "internal",
        };
        f.write_str(s)
    }
}

/// One stored entry or mailbox item as read back. When `bytes` is shorter than `total_len`,
/// the rest is fetched with a read-part request from `bytes.len()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Position in the log or mailbox, from 1, strictly increasing.
    pub seq: u64,
    /// Full length of the entry.
    pub total_len: u32,
    /// The entry, or its first part.
    pub bytes: Vec<u8>,
}

/// What one device has left in its key-package pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The device.
    pub device: DeviceId,
    /// One-time key packages left.
    pub remaining: u32,
    /// Whether a last-resort key package is stored.
    pub last_resort: bool,
}

/// A successful answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Response {
    /// Done; nothing to return.
    Ok,
    /// Answer to [`Request::Ping`].
    Pong,
    /// Where an appended entry or dropped item now stands (the first one's, for a retry).
    Seq(u64),
    /// Items read, oldest first; `more` is true when the reader should ask again.
    Items { items: Vec<Item>, more: bool },
    /// A part of a large entry.
    Part(Vec<u8>),
    /// Claimed key packages, one per device.
    KeyPackages(Vec<Vec<u8>>),
    /// Key-package pool per device.
    KeyPackageStatus(Vec<DeviceStatus>),
    /// How many bytes of an upload the server holds, from offset 0 without gaps.
    Upload { received: u32 },
}

/// A frame the server sends without being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Push {
    /// New entries of a subscribed log.
    Items { log: LogId, items: Vec<Item> },
    /// The subscription ended (the client was too slow to keep up); read and subscribe again.
    SubscriptionLost { log: LogId },
}

/// A frame from server to client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerFrame {
    /// The answer to the request with this id.
    Response { request_id: u32, result: Result<Response, ErrorCode> },
    /// An unsolicited push.
    Push(Push),
}

mod resp {
    pub(super) const OK: u8 = 0;
    pub(super) const PONG: u8 = 1;
    pub(super) const SEQ: u8 = 2;
    pub(super) const ITEMS: u8 = 3;
    pub(super) const PART: u8 = 4;
    pub(super) const KEY_PACKAGES: u8 = 5;
    pub(super) const KEY_PACKAGE_STATUS: u8 = 6;
    pub(super) const UPLOAD: u8 = 7;
}

const KIND_RESPONSE: u8 = 0;
const KIND_PUSH: u8 = 1;
const PUSH_ITEMS: u8 = 0;
const PUSH_LOST: u8 = 1;

fn encode_items(w: &mut Writer, items: &[Item]) {
    w.u8(u8::try_from(items.len()).unwrap_or(u8::MAX));
    for item in items {
        w.u64(item.seq).u32(item.total_len).bytes(&item.bytes);
    }
}

fn decode_items(r: &mut Reader<'_>) -> Result<Vec<Item>, DecodeError> {
    let count = usize::from(r.u8()?);
    if count > MAX_ITEMS {
        return Err(DecodeError::TooLong);
    }
    let mut items = Vec::with_capacity(count);
    for _ in 0..count {
        let seq = r.u64()?;
        let total_len = r.u32()?;
        let bytes = r.bytes(MAX_INLINE)?.to_vec();
        if bytes.len() > total_len as usize {
            return Err(DecodeError::Invalid("item length"));
        }
        items.push(Item { seq, total_len, bytes });
    }
    Ok(items)
}

impl ServerFrame {
    /// Wire bytes (before padding).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.u8(VERSION);
        match self {
            ServerFrame::Response { request_id, result } => {
                w.u8(KIND_RESPONSE).u32(*request_id);
                match result {
                    Err(code) => {
                        w.u8(code.code());
                    }
                    Ok(resp) => {
                        w.u8(0);
                        encode_response(&mut w, resp);
                    }
                }
            }
            ServerFrame::Push(Push::Items { log, items }) => {
                w.u8(KIND_PUSH).u8(PUSH_ITEMS).fixed(&log.0);
                encode_items(&mut w, items);
            }
            ServerFrame::Push(Push::SubscriptionLost { log }) => {
                w.u8(KIND_PUSH).u8(PUSH_LOST).fixed(&log.0);
            }
        }
        w.finish()
    }

    /// Strictly decodes a server frame.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_FRAME {
            return Err(DecodeError::TooLong);
        }
        let mut r = Reader::new(bytes);
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let frame = match r.u8()? {
            KIND_RESPONSE => {
                let request_id = r.u32()?;
                let status = r.u8()?;
                let result = if status == 0 {
                    Ok(decode_response(&mut r)?)
                } else {
                    Err(ErrorCode::from_code(status).ok_or(DecodeError::Invalid("error code"))?)
                };
                ServerFrame::Response { request_id, result }
            }
            KIND_PUSH => match r.u8()? {
                PUSH_ITEMS => {
                    let log = LogId(r.array()?);
                    ServerFrame::Push(Push::Items { log, items: decode_items(&mut r)? })
                }
                PUSH_LOST => ServerFrame::Push(Push::SubscriptionLost { log: LogId(r.array()?) }),
                _ => return Err(DecodeError::Invalid("push kind")),
            },
            _ => return Err(DecodeError::Invalid("frame kind")),
        };
        r.finish()?;
        Ok(frame)
    }
}

fn encode_response(w: &mut Writer, resp: &Response) {
    match resp {
        Response::Ok => {
            w.u8(resp::OK);
        }
        Response::Pong => {
            w.u8(resp::PONG);
        }
        Response::Seq(seq) => {
            w.u8(resp::SEQ).u64(*seq);
        }
        Response::Items { items, more } => {
            w.u8(resp::ITEMS).bool(*more);
            encode_items(w, items);
        }
        Response::Part(bytes) => {
            w.u8(resp::PART).bytes(bytes);
        }
        Response::KeyPackages(packages) => {
            w.u8(resp::KEY_PACKAGES).u8(u8::try_from(packages.len()).unwrap_or(u8::MAX));
            for p in packages {
                w.bytes(p);
            }
        }
        Response::KeyPackageStatus(devices) => {
            w.u8(resp::KEY_PACKAGE_STATUS).u8(u8::try_from(devices.len()).unwrap_or(u8::MAX));
            for d in devices {
                w.fixed(&d.device.0).u32(d.remaining).bool(d.last_resort);
            }
        }
        Response::Upload { received } => {
            w.u8(resp::UPLOAD).u32(*received);
        }
    }
}

fn decode_response(r: &mut Reader<'_>) -> Result<Response, DecodeError> {
    Ok(match r.u8()? {
        resp::OK => Response::Ok,
        resp::PONG => Response::Pong,
        resp::SEQ => Response::Seq(r.u64()?),
        resp::ITEMS => {
            let more = r.bool()?;
            Response::Items { items: decode_items(r)?, more }
        }
        resp::PART => Response::Part(r.bytes(MAX_INLINE)?.to_vec()),
        resp::KEY_PACKAGES => {
            let count = usize::from(r.u8()?);
            if count > MAX_DEVICES {
                return Err(DecodeError::TooLong);
            }
            let mut packages = Vec::with_capacity(count);
            for _ in 0..count {
                packages.push(r.bytes(MAX_KEY_PACKAGE)?.to_vec());
            }
            Response::KeyPackages(packages)
        }
        resp::KEY_PACKAGE_STATUS => {
            let count = usize::from(r.u8()?);
            if count > MAX_DEVICES {
                return Err(DecodeError::TooLong);
            }
            let mut devices = Vec::with_capacity(count);
            for _ in 0..count {
                devices.push(DeviceStatus {
                    device: DeviceId(r.array()?),
                    remaining: r.u32()?,
                    last_resort: r.bool()?,
                });
            }
            Response::KeyPackageStatus(devices)
        }
        resp::UPLOAD => Response::Upload { received: r.u32()? },
        _ => return Err(DecodeError::Invalid("response kind")),
    })
}

#[cfg(test)]
mod tests;
