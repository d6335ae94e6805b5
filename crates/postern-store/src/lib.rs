//! The server's storage contract.
//!
//! A [`Store`] holds only what `docs/server-disclosure.md` lists: random ids, public keys,
//! opaque blobs, sizes and expiry days. It knows nothing of MLS, users or contacts.
//!
//! **Architecture Invariant:** every operation that stores data is durable when its future
//! resolves `Ok`: the server acknowledges to clients only after that. Back ends batch many
//! operations into one synced commit to make this cheap.
//!
//! **Architecture Invariant:** a missing object and one the caller may not touch are the same
//! [`StoreError::NotFound`], so answers cannot be used to probe for ids.
//!
//! Every back end runs the same suite, [`conformance`], through [`conformance_tests!`].

use std::future::Future;

use postern_proto::frame::{ClaimPolicy, DeviceStatus, Item};
use postern_proto::ids::{
    DeviceId, DropId, IdemKey, KeyId, LogId, MailboxId, PublicKey, TokenHash, UploadId,
};

pub mod conformance;

/// Days since the Unix epoch. Stored times are coarsened to days (expiry only).
pub type Day = u32;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No such object, or the caller may not use it.
    #[error("not found")]
    NotFound,
    /// The id already exists, or an idempotency key was reused with other content.
    #[error("conflict")]
    Conflict,
    /// A per-capability quota is full.
    #[error("quota exceeded")]
    QuotaExceeded,
    /// The global disk quota is reached.
    #[error("server full")]
    ServerFull,
    /// A rate limit (claims per day) is reached.
    #[error("rate limited")]
    RateLimited,
    /// The request is inconsistent with stored state (an upload offset past what was received,
    /// an incomplete upload used as a body).
    #[error("bad request")]
    BadRequest,
    /// The database failed. The operation was not applied.
    #[error("storage back end failed: {0}")]
    Backend(String),
}

/// How long data is kept, in days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Log entries without a next-epoch key (application messages).
    pub entry_days: u32,
    /// Log entries that carry a next-epoch key (commits), and append keys after last use.
    pub commit_days: u32,
    /// Mailbox items.
    pub drop_days: u32,
    /// Mailboxes, drop addresses and key packages, after the owner's last request.
    pub mailbox_days: u32,
    /// Unfinished uploads.
    pub upload_days: u32,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            entry_days: 30,
            commit_days: 180,
            drop_days: 30,
            mailbox_days: 180,
            upload_days: 1,
        }
    }
}

/// Per-capability and global limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    /// Bytes of entries one log may hold.
    pub log_bytes: u64,
    /// Append keys one log may have registered.
    pub log_keys: u32,
    /// Unread bytes one drop address may hold.
    pub drop_bytes: u64,
    /// Drop addresses per mailbox.
    pub drops_per_mailbox: u32,
    /// Key packages per device (the last-resort one not counted).
    pub key_packages_per_device: u32,
    /// Devices per mailbox.
    pub devices_per_mailbox: u32,
    /// Claim tokens per mailbox.
    pub claim_tokens_per_mailbox: u32,
    /// Total bytes the database may use before new data is refused.
    pub disk_bytes: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            log_bytes: 256 << 20,
            log_keys: 4_096,
            drop_bytes: 16 << 20,
            drops_per_mailbox: 1_024,
            key_packages_per_device: 200,
            devices_per_mailbox: postern_proto::limits::MAX_DEVICES as u32,
            claim_tokens_per_mailbox: 1_024,
            disk_bytes: 10 << 30,
        }
    }
}

/// One entry to append, already verified by the server against the log's append key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    /// Idempotency key from the envelope.
    pub idem: IdemKey,
    /// The key that signed it; its expiry is extended.
    pub key_id: KeyId,
    /// The next-epoch key the entry registers, if it is a commit.
    pub next_key: Option<PublicKey>,
    /// The whole envelope.
    pub data: Vec<u8>,
    /// The upload that carried it, consumed in the same transaction.
    pub from_upload: Option<UploadId>,
}

/// The result of an append or drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The entry's sequence number.
    pub seq: u64,
    /// False when the idempotency key matched an earlier identical entry.
    pub new: bool,
}

/// What a read returns: items, with `more` when the reader should continue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Page {
    /// Items, oldest first; large ones truncated (read the rest with a read-part call).
    pub items: Vec<Item>,
    /// Whether more items follow.
    pub more: bool,
}

/// Counts from an expiry sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Swept {
    /// Log entries removed.
    pub entries: u64,
    /// Mailbox items removed.
    pub items: u64,
    /// Mailboxes, logs, keys, key packages, tokens and uploads removed.
    pub other: u64,
}

/// Storage use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in use.
    pub used_bytes: u64,
    /// The configured global quota.
    pub quota_bytes: u64,
}

/// A read budget: at most this many items, and at most this many bytes of item data and
/// framing (so the answer fits one frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLimit {
    /// Most items.
    pub max_items: usize,
    /// Most bytes: item bytes plus [`ITEM_OVERHEAD`] per item.
    pub max_bytes: usize,
}

/// Framing bytes per item in a response (sequence number, lengths).
pub const ITEM_OVERHEAD: usize = 16;

/// The server's storage. See the crate docs for the invariants every back end keeps.
pub trait Store: Send + Sync + 'static {
    /// Creates a mailbox. [`StoreError::Conflict`] when the id exists.
    fn create_mailbox(
        &self,
        mailbox: MailboxId,
        owner_key: PublicKey,
        today: Day,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The owner key of a mailbox. Also extends the mailbox's expiry from `today` (back ends
    /// may do this lazily, at most about once a week per mailbox).
    fn owner_key(
        &self,
        mailbox: MailboxId,
        today: Day,
    ) -> impl Future<Output = Result<PublicKey, StoreError>> + Send;

    /// Adds a drop address to a mailbox. Re-adding the same address is a no-op.
    fn create_drop(
        &self,
        mailbox: MailboxId,
        drop: DropId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes a drop address and its unread items.
    fn revoke_drop(
        &self,
        mailbox: MailboxId,
        drop: DropId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Stores an item dropped through `drop`; idempotent by `(drop, idem)`.
    fn drop_item(
        &self,
        drop: DropId,
        idem: IdemKey,
        data: Vec<u8>,
        from_upload: Option<UploadId>,
        today: Day,
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send;

    /// Items after `after`.
    fn fetch_mailbox(
        &self,
        mailbox: MailboxId,
        after: u64,
        limit: ReadLimit,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// Up to `max` bytes of item `seq` from `offset`.
    fn read_mailbox_part(
        &self,
        mailbox: MailboxId,
        seq: u64,
        offset: u32,
        max: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;

    /// Deletes items up to and including `through`.
    fn delete_mailbox_items(
        &self,
        mailbox: MailboxId,
        through: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Adds key packages to a device's pool; a last-resort upload replaces the previous one.
    /// A package already in the pool is not stored again (an upload may be a retry).
    fn upload_key_packages(
        &self,
        mailbox: MailboxId,
        device: DeviceId,
        last_resort: bool,
        packages: Vec<Vec<u8>>,
        today: Day,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Pool sizes per device.
    fn key_package_status(
        &self,
        mailbox: MailboxId,
    ) -> impl Future<Output = Result<Vec<DeviceStatus>, StoreError>> + Send;

    /// Registers a claim token by its hash.
    fn create_claim_token(
        &self,
        mailbox: MailboxId,
        token: TokenHash,
        policy: ClaimPolicy,
        expires_day: Day,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Revokes a claim token.
    fn revoke_claim_token(
        &self,
        mailbox: MailboxId,
        token: TokenHash,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Takes one key package per device of the token's mailbox (a device's last-resort package
    /// when its pool is empty; it is not removed). Uses up a one-time token; counts against a
    /// daily token's limit.
    fn claim_key_packages(
        &self,
        token: TokenHash,
        today: Day,
    ) -> impl Future<Output = Result<Vec<Vec<u8>>, StoreError>> + Send;

    /// Creates a log with its first append key. Creating a log that exists, signed by a key
    /// it holds, succeeds and extends that key's life as an append would (members keep a
    /// quiet log alive this way); with any other key it is a conflict.
    fn create_log(
        &self,
        log: LogId,
        key: PublicKey,
        today: Day,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// An append key registered for a log and not expired.
    fn log_key(
        &self,
        log: LogId,
        key_id: KeyId,
    ) -> impl Future<Output = Result<PublicKey, StoreError>> + Send;

    /// Appends a verified entry; idempotent by `(log, idem)`.
    fn append(
        &self,
        log: LogId,
        entry: NewEntry,
        today: Day,
    ) -> impl Future<Output = Result<Appended, StoreError>> + Send;

    /// Entries after `after`.
    fn read_log(
        &self,
        log: LogId,
        after: u64,
        limit: ReadLimit,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// Up to `max` bytes of entry `seq` from `offset`.
    fn read_log_part(
        &self,
        log: LogId,
        seq: u64,
        offset: u32,
        max: usize,
    ) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;

    /// Stores one chunk of an upload; returns how many bytes are held from offset 0 without a
    /// gap. A chunk must start at or before that point; resending a chunk is harmless.
    fn upload_chunk(
        &self,
        upload: UploadId,
        total_len: u32,
        offset: u32,
        bytes: Vec<u8>,
        today: Day,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// The bytes of a complete upload; [`StoreError::BadRequest`] when it is incomplete.
    fn upload_bytes(
        &self,
        upload: UploadId,
    ) -> impl Future<Output = Result<Vec<u8>, StoreError>> + Send;

    /// Deletes everything whose expiry day is before `today`.
    fn sweep(&self, today: Day) -> impl Future<Output = Result<Swept, StoreError>> + Send;

    /// Bytes in use and the quota.
    fn usage(&self) -> impl Future<Output = Result<Usage, StoreError>> + Send;
}
