//! Postern's wire protocol, shared by the server, the client, the load tool and relays.
//!
//! Everything here is pure: no sockets, no clock, no async runtime. Callers pass time and
//! randomness in. The layers, outermost first:
//!
//! - [`gate`]: the token a client puts in its first HTTP request to prove it knows the server
//!   link's access secret. Without it, the server is an ordinary website.
//! - [`session`]: a Noise NK session to the server's static key, whose transport messages
//!   carry padded frames ([`pad`]), so TLS terminators and relays see only opaque blobs.
//! - [`frame`]: client requests and server responses and pushes.
//! - [`envelope`]: what a conversation log stores, signed by a per-epoch append key.
//! - [`content`]: what clients say to each other inside encryption (key-package payloads,
//!   mailbox drops, application messages); the server never decodes these.
//! - [`credential`]: the device credential every group member checks.
//! - [`link`]: the `postern://server#…` link that carries address, pins, static key and secret,
//!   and the `postern://relay#…` link to a relay.
//! - [`relay`]: relay credentials and the relay's gate token.
//!
//! `docs/protocol.md` is the normative description; this crate is its implementation.
//!
//! ```
//! use postern_proto::frame::{ClientFrame, Request};
//! let frame = ClientFrame { request_id: 7, request: Request::Ping, signature: None };
//! let bytes = frame.encode();
//! assert_eq!(ClientFrame::decode(&bytes).unwrap(), frame);
//! ```

mod codec;
pub mod content;
pub mod credential;
pub mod envelope;
pub mod frame;
pub mod gate;
pub mod ids;
pub mod limits;
pub mod link;
pub mod pad;
pub mod relay;
pub mod session;

/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;

/// Why bytes from outside could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before the value did.
    #[error("truncated input")]
    Truncated,
    /// A length field exceeds the protocol limit for that field.
    #[error("value longer than the protocol allows")]
    TooLong,
    /// Bytes remained after a complete value.
    #[error("trailing bytes after value")]
    TrailingBytes,
    /// A tag, flag or count has a value the protocol does not define.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// The frame names a protocol version this build does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
}
