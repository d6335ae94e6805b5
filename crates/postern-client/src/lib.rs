//! The Postern client core: a user's identity and device, the local store (encrypted at
//! rest with SQLCipher), and, as they are built, contacts, chats and MLS.
//!
//! A *home* is a directory holding one client's state. One process owns a home at a time
//! ([`Home`] holds an exclusive lock); other processes get [`ClientError::Busy`].
//!
//! ```no_run
//! use postern_client::{Client, KeySource};
//! # fn link() -> postern_proto::link::ServerLink { unimplemented!() }
//! let home = std::path::Path::new("alice-home");
//! let client = Client::init(home, KeySource::KeyFile, "Alice", link())?;
//! println!("{}", client.whoami().fingerprint);
//! # Ok::<(), postern_client::ClientError>(())
//! ```

use std::path::{Path, PathBuf};

use postern_proto::frame::{ClaimPolicy, Request};
use postern_proto::ids::{ClaimToken, DropId};
pub use postern_proto::link::{InviteKind, InviteLink};
use postern_proto::link::{LinkError, RelayLink, ServerLink};

#[cfg(feature = "bench")]
pub mod bench;

/// A well-formed server link to a server nobody runs, for clients that never connect
/// (unit tests and benchmarks).
#[cfg(any(test, feature = "bench"))]
pub(crate) fn offline_link() -> ServerLink {
    ServerLink {
        addrs: vec!["127.0.0.1:8443".into()],
        server_name: None,
        pins: vec![[1; 32]],
        static_key: [2; 32],
        secret: postern_proto::gate::AccessSecret([3; 32]),
    }
}
mod chats;
pub mod doors;
pub mod envelope;
mod gaps;
mod groups;
mod identity;
mod mls;
mod moves;
mod store;

pub use chats::{
    ChatSummary, ConnectRequest, Contact, Event, HistoryItem, LogCursor, Message, MessageState,
    OutboxItem, OutboxOp, pause_point, today,
};
pub use gaps::{Gap, REJOIN_HELPERS};
pub use groups::{Card, GroupRules, Member};
pub use identity::{DeviceCredential, Identity, fingerprint};
pub use mls::{CIPHERSUITE, EpochKeys, MlsError, Received};
pub use moves::{ChatServer, Successor};
use postern_proto::ids::PublicKey;
pub use store::KeySource;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// `init` on a home that already has a client.
    #[error("{0} already holds a Postern client")]
    AlreadyInitialized(PathBuf),
    /// Any other command on a home without a client.
    #[error("no Postern client in {0}: run `postern init` first")]
    NotInitialized(PathBuf),
    /// The store would not open with the key given: a wrong passphrase, a wrong or missing
    /// key file, or a corrupt database. Nothing was changed.
    #[error(
        "cannot open the local store in {0}: wrong passphrase or key file, or a damaged database"
    )]
    WrongKey(PathBuf),
    /// The home was created with a passphrase and none was given.
    #[error("the local store in {0} is protected by a passphrase: set POSTERN_PASSPHRASE")]
    PassphraseRequired(PathBuf),
    /// Another process owns the home.
    #[error("another postern process is using {0}")]
    Busy(PathBuf),
    /// The server link is invalid.
    #[error("invalid server link: {0}")]
    InvalidLink(#[from] LinkError),
    /// A display name must be 1 to 64 characters, without control characters.
    #[error("a name must be 1 to 64 characters, without control characters")]
    InvalidName,
    /// A message must be 1 to 8,192 bytes of text.
    #[error("a message must be 1 to 8192 bytes of text")]
    InvalidMessage,
    /// No chat, contact or request by that name or id.
    #[error("no chat, contact or request called {0:?}")]
    NotFound(String),
    /// `connect` with one's own invite.
    #[error("this invite is your own")]
    OwnInvite,
    /// A contact's card (how to add them to groups) has not arrived yet.
    #[error("{0}'s contact card has not arrived yet: run `postern sync` once they are online")]
    NoCard(String),
    /// A group command on a 1:1 chat.
    #[error("{0} is not a group")]
    NotAGroup(String),
    /// A command on a group we have left or been removed from.
    #[error("you are no longer a member of {0}")]
    NotAMember(String),
    /// This device fell behind the group's history and waits to be re-added.
    #[error(
        "this device was away longer than the server keeps {0}'s history; it has asked members to re-add it"
    )]
    Rejoining(String),
    /// The group's rules let only its admins do that.
    #[error("only the group's admins may do that")]
    NotAllowed,
    /// A file in the home could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database failed.
    #[error("local store: {0}")]
    Store(String),
    /// An MLS operation failed; nothing was changed.
    #[error(transparent)]
    Mls(#[from] MlsError),
    /// `servers add` with the home server's own link.
    #[error("that is your home server; add another server")]
    OwnServer,
    /// Stored state breaks an invariant (a bug, or a store written by a newer version).
    #[error("internal error: {0}")]
    Internal(&'static str),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io { path: path.to_owned(), source }
}

/// An owned home directory: the lock is held until this is dropped.
#[derive(Debug)]
pub struct Home {
    dir: PathBuf,
    _lock: std::fs::File,
}

const LOCK_FILE: &str = "lock";

impl Home {
    /// Takes the home's lock, creating the directory (mode 0700) when `create` is set.
    pub fn lock(dir: &Path, create: bool) -> Result<Self, ClientError> {
        if create {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err(dir))?;
        } else if !dir.join(store::DATABASE).exists() {
            return Err(ClientError::NotInitialized(dir.to_owned()));
        }
        let path = dir.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        match file.try_lock() {
            Ok(()) => Ok(Home { dir: dir.to_owned(), _lock: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(ClientError::Busy(dir.to_owned())),
            Err(std::fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// What `whoami` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhoAmI {
    /// The display name chosen at `init`.
    pub name: String,
    /// The identity's safety number.
    pub fingerprint: String,
    /// This device's id, hex.
    pub device: String,
    /// Addresses of the home server.
    pub server: Vec<String>,
}

/// This user's mailbox: where first contacts arrive, and where this device's key packages
/// wait to be claimed.
#[derive(Clone)]
pub struct MailboxKeys {
    /// The mailbox's private id.
    pub mailbox: postern_proto::ids::MailboxId,
    /// The owner key that signs every mailbox request.
    pub owner: ed25519_dalek::SigningKey,
    /// The key that encrypts key packages on the server; invites carry it.
    pub kp_key: [u8; 32],
}

impl std::fmt::Debug for MailboxKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailboxKeys").field("mailbox", &self.mailbox).finish_non_exhaustive()
    }
}

impl MailboxKeys {
    fn generate() -> Self {
        use rand::RngCore;
        let mut rng = rand::rngs::OsRng;
        let mut id = [0u8; 32];
        let mut kp_key = [0u8; 32];
        rng.fill_bytes(&mut id);
        rng.fill_bytes(&mut kp_key);
        MailboxKeys {
            mailbox: postern_proto::ids::MailboxId(id),
            owner: ed25519_dalek::SigningKey::generate(&mut rng),
            kp_key,
        }
    }
}

/// How long an invite's claim token lasts, in days.
pub const INVITE_DAYS: u32 = 30;
/// Claims per day through a long-lived address.
pub const ADDRESS_CLAIMS_PER_DAY: u16 = 20;

/// An invite ready to register: send `requests` signed by `owner`, then show `link`.
#[derive(Debug)]
pub struct NewInvite {
    /// The link to give to the person invited.
    pub link: InviteLink,
    /// The requests that register its drop address and claim token.
    pub requests: Vec<Request>,
    /// The mailbox owner key that signs them.
    pub owner: ed25519_dalek::SigningKey,
}

/// One-time key packages uploaded per device at first publication.
pub const KEY_PACKAGES_PER_UPLOAD: usize = 10;
/// Key packages per upload request.
const KEY_PACKAGES_PER_REQUEST: usize = 2;

/// What must reach the server before anyone can contact this user: the mailbox and this
/// device's key packages. Send each request signed by `owner`, in order.
#[derive(Debug)]
pub struct Publication {
    /// The requests, in order.
    pub requests: Vec<Request>,
    /// The key that signs them.
    pub owner: ed25519_dalek::SigningKey,
}

/// An open client.
#[derive(Debug)]
pub struct Client {
    home: Home,
    store: store::Store,
    identity: Identity,
    server: ServerLink,
    /// The network the device is on, as [`on_network`](Self::on_network) last named it
    /// (`None` before it was told; `Some("")` unknown).
    network: Option<String>,
}

pub(crate) fn check_name(name: &str) -> Result<(), ClientError> {
    let n = name.chars().count();
    if n == 0 || n > 64 || name.chars().any(char::is_control) || name.trim() != name {
        return Err(ClientError::InvalidName);
    }
    Ok(())
}

impl Client {
    /// Creates a client in `dir`: a new identity and device, and the home server.
    pub fn init(
        dir: &Path,
        key: KeySource,
        name: &str,
        server: ServerLink,
    ) -> Result<Self, ClientError> {
        check_name(name)?;
        if dir.join(store::DATABASE).exists() {
            return Err(ClientError::AlreadyInitialized(dir.to_owned()));
        }
        let home = Home::lock(dir, true)?;
        let identity = Identity::generate(name);
        let store = store::Store::create(home.dir(), &key)?;
        store.save_identity(&identity, &server)?;
        store.save_mailbox(&MailboxKeys::generate())?;
        Ok(Client { home, store, identity, server, network: None })
    }

    /// A second device of `existing`'s user in `dir`: the same identity, mailbox and name,
    /// a new device key. **Test hook**: real device linking (a QR code between devices,
    /// with its own key transfer) is not built yet; the CLI exposes this only as a hidden
    /// flag so tests can run a user with two devices.
    pub fn init_device_of(
        dir: &Path,
        key: KeySource,
        existing: &Client,
    ) -> Result<Self, ClientError> {
        if dir.join(store::DATABASE).exists() {
            return Err(ClientError::AlreadyInitialized(dir.to_owned()));
        }
        let home = Home::lock(dir, true)?;
        let mut identity = Identity::generate(&existing.identity.name);
        identity.identity_key = existing.identity.identity_key.clone();
        let store = store::Store::create(home.dir(), &key)?;
        store.save_identity(&identity, &existing.server)?;
        store.save_mailbox(&existing.mailbox()?)?;
        let (private, public) = existing.store.hpke_keypair()?;
        store.set_hpke_keypair(&private, &public)?;
        Ok(Client { home, store, identity, server: existing.server.clone(), network: None })
    }

    /// Opens the client in `dir`.
    pub fn open(dir: &Path, key: KeySource) -> Result<Self, ClientError> {
        let home = Home::lock(dir, false)?;
        let store = store::Store::open(home.dir(), &key)?;
        let (identity, server) = store.load_identity()?;
        Ok(Client { home, store, identity, server, network: None })
    }

    /// Who this client is.
    pub fn whoami(&self) -> WhoAmI {
        WhoAmI {
            name: self.identity.name.clone(),
            fingerprint: self.identity.fingerprint(),
            device: self.identity.device_id_hex(),
            server: self.server.addrs.clone(),
        }
    }

    /// The identity.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The home directory.
    pub fn home(&self) -> &Path {
        self.home.dir()
    }

    /// The home server's link.
    pub fn server(&self) -> &ServerLink {
        &self.server
    }

    /// Runs one step of the state machine in one transaction: committed when it succeeds,
    /// rolled back (with any group it loaded) when it fails.
    fn step<T>(
        &mut self,
        op: impl FnOnce(&chats::Ctx<'_>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        self.step_at(None, op)
    }

    /// [`step`](Self::step) with `home` as the home server instead of ours.
    fn step_at<T>(
        &mut self,
        home: Option<&ServerLink>,
        op: impl FnOnce(&chats::Ctx<'_>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let tx = self.store.transaction()?;
        let ctx = chats::Ctx {
            db: &tx,
            mls: mls::Provider::new(&tx),
            me: &self.identity,
            server: home.unwrap_or(&self.server),
        };
        let value = op(&ctx)?;
        tx.commit().map_err(|e| ClientError::Store(e.to_string()))?;
        Ok(value)
    }

    /// Runs one MLS operation in one transaction.
    fn in_transaction<T>(
        &mut self,
        op: impl FnOnce(&mls::Provider<'_>, &Identity) -> Result<T, MlsError>,
    ) -> Result<T, ClientError> {
        self.step(|ctx| Ok(op(&ctx.mls, ctx.me)?))
    }

    /// A new key package for this device, to hand to someone who will add it to a group.
    pub fn key_package(&mut self, last_resort: bool) -> Result<Vec<u8>, ClientError> {
        self.in_transaction(|p, id| mls::new_key_package(p, id, last_resort))
    }

    /// Creates a group with the devices behind `key_packages` (their credentials are checked).
    /// Returns the group id, the commit to append and the Welcome to send once it has won.
    pub fn create_group(&mut self, key_packages: &[Vec<u8>]) -> Result<NewGroup, ClientError> {
        self.in_transaction(|p, id| {
            let members = key_packages
                .iter()
                .map(|kp| mls::peer_key_package(p, kp))
                .collect::<Result<Vec<_>, _>>()?;
            let created = mls::create_group(p, id, &members, None, &[])?;
            Ok(NewGroup {
                group_id: created.group_id,
                commit: created.commit,
                welcome: created.welcome,
            })
        })
    }

    /// Applies our pending commit after it has won its place in the log.
    pub fn merge_pending_commit(&mut self, group_id: &[u8]) -> Result<(), ClientError> {
        self.in_transaction(|p, _| mls::merge_pending(p, group_id).map(|_| ()))
    }

    /// Joins a group from a Welcome; returns its id and the members' device credentials.
    pub fn join_group(
        &mut self,
        welcome: &[u8],
    ) -> Result<(Vec<u8>, Vec<DeviceCredential>), ClientError> {
        self.in_transaction(|p, _| {
            mls::join(p, welcome, |_| false).map(|j| (j.group_id, j.members))
        })
    }

    /// Encrypts an application message for a group.
    pub fn encrypt(&mut self, group_id: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, ClientError> {
        self.in_transaction(|p, id| mls::encrypt(p, id, group_id, plaintext))
    }

    /// Decrypts and applies one message from a group's log.
    pub fn receive(&mut self, group_id: &[u8], message: &[u8]) -> Result<Received, ClientError> {
        self.in_transaction(|p, _| mls::receive(p, group_id, message))
    }

    /// The mailbox keys.
    pub fn mailbox(&self) -> Result<MailboxKeys, ClientError> {
        Ok(self.mailbox_state()?.0)
    }

    /// The mailbox and whether it is published; made now in a home that predates mailboxes.
    fn mailbox_state(&self) -> Result<(MailboxKeys, bool), ClientError> {
        if let Some(state) = self.store.load_mailbox()? {
            return Ok(state);
        }
        let keys = MailboxKeys::generate();
        self.store.save_mailbox(&keys)?;
        Ok((keys, false))
    }

    /// The requests that publish the mailbox and key packages, or `None` when done. Key
    /// packages are made (and their secrets stored) here, once; a retry resends the same
    /// kind of requests with fresh packages, and the server treats a second
    /// `mailbox_create` as a conflict, which the caller takes as success.
    pub fn pending_publication(&mut self) -> Result<Option<Publication>, ClientError> {
        let (keys, published) = self.mailbox_state()?;
        if published {
            return Ok(None);
        }
        let owner_key = postern_proto::ids::public_key(&keys.owner);
        let device = postern_proto::ids::DeviceId(self.identity.device_id);
        let mut fresh = Vec::with_capacity(KEY_PACKAGES_PER_UPLOAD);
        for _ in 0..KEY_PACKAGES_PER_UPLOAD {
            fresh.push(self.sealed_key_package(&keys.kp_key, false)?);
        }
        let last = self.sealed_key_package(&keys.kp_key, true)?;
        let mailbox = keys.mailbox;
        let mut requests = vec![Request::MailboxCreate { mailbox, owner_key }];
        // A few packages per request, so each stays in a small frame (a connection under a
        // censor's packet budget carries only a few), and a retry resends little.
        for packages in fresh.chunks(KEY_PACKAGES_PER_REQUEST) {
            let packages = packages.to_vec();
            requests.push(Request::KeyPackageUpload {
                mailbox,
                device,
                last_resort: false,
                packages,
            });
        }
        requests.push(Request::KeyPackageUpload {
            mailbox,
            device,
            last_resort: true,
            packages: vec![last],
        });
        Ok(Some(Publication { requests, owner: keys.owner }))
    }

    /// A new invite: a fresh drop address and claim token, and the requests that register
    /// them (send each signed by the returned owner key, before showing the link). A one-time
    /// invite's token allows one claim; an address allows [`ADDRESS_CLAIMS_PER_DAY`] a day.
    /// Both expire after [`INVITE_DAYS`].
    pub fn new_invite(&mut self, kind: InviteKind, today: u32) -> Result<NewInvite, ClientError> {
        use rand::RngCore;
        let (keys, _) = self.mailbox_state()?;
        let (_, hpke_public) = self.store.hpke_keypair()?;
        let mut drop = [0u8; 32];
        let mut token = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut drop);
        rand::rngs::OsRng.fill_bytes(&mut token);
        let expires_day = today.saturating_add(INVITE_DAYS);
        let (policy, name) = match kind {
            InviteKind::Once => (ClaimPolicy::Once, "once"),
            InviteKind::Address => (ClaimPolicy::Daily(ADDRESS_CLAIMS_PER_DAY), "address"),
        };
        self.store.save_invite(&drop, &token, name, expires_day)?;
        let token = ClaimToken(token);
        let requests = vec![
            Request::DropCreate { mailbox: keys.mailbox, drop: DropId(drop) },
            Request::ClaimTokenCreate {
                mailbox: keys.mailbox,
                token_hash: token.hash(),
                policy,
                expires_day,
            },
        ];
        let link = InviteLink {
            kind,
            server: self.server.clone(),
            drop: DropId(drop),
            hpke_key: hpke_public,
            kp_key: keys.kp_key,
            token,
            identity: self.identity.identity_public(),
            relays: self.relays_to_share()?,
        };
        Ok(NewInvite { link, requests, owner: keys.owner })
    }

    /// A new key package with our display name, sealed under the key-package key.
    fn sealed_key_package(
        &mut self,
        kp_key: &[u8; 32],
        last_resort: bool,
    ) -> Result<Vec<u8>, ClientError> {
        let payload = postern_proto::content::KeyPackagePayload {
            name: self.identity.name.clone(),
            key_package: self.key_package(last_resort)?,
        };
        Ok(envelope::seal_key_package(kp_key, &payload.encode())?)
    }

    /// Records that the publication reached the server.
    pub fn mark_published(&mut self) -> Result<(), ClientError> {
        self.store.mark_published()
    }

    /// The keys members derive from the group's current epoch.
    pub fn epoch_keys(&mut self, group_id: &[u8]) -> Result<EpochKeys, ClientError> {
        self.in_transaction(|p, _| mls::epoch_keys(p, group_id))
    }

    /// Starts a chat from a one-time invite, with the inviter's key packages claimed with
    /// its token (sealed as the server returned them). The chat becomes active when its
    /// creation reaches the server through the outbox. Returns the chat id and contact name.
    pub fn connect_once(
        &mut self,
        link: &InviteLink,
        sealed: &[Vec<u8>],
    ) -> Result<(String, String), ClientError> {
        self.check_not_own(link)?;
        self.step(|ctx| chats::connect_once(ctx, link, sealed))
    }

    /// Queues a request to connect through a long-lived address.
    pub fn request_connect(&mut self, link: &InviteLink) -> Result<(), ClientError> {
        self.check_not_own(link)?;
        self.mailbox_state()?;
        self.step(|ctx| chats::request_connect(ctx, link))
    }

    fn check_not_own(&self, link: &InviteLink) -> Result<(), ClientError> {
        if link.identity == self.identity.identity_public() {
            return Err(ClientError::OwnInvite);
        }
        Ok(())
    }

    /// Accepts a request: creates the chat (through the outbox). Returns chat id and name.
    pub fn accept(&mut self, request: &str) -> Result<(String, String), ClientError> {
        self.step(|ctx| chats::accept(ctx, request))
    }

    /// Queues a text message; returns its id for [`Client::message_state`].
    pub fn queue_message(&mut self, chat: &str, text: &str) -> Result<i64, ClientError> {
        self.step(|ctx| chats::queue_message(ctx, chat, text))
    }

    /// The id of a chat named by its id, its contact's name or its group's name.
    pub fn chat_id(&mut self, chat: &str) -> Result<String, ClientError> {
        self.step(|ctx| Ok(chats::resolve(ctx, chat)?.reference))
    }

    /// Where an outgoing message stands.
    pub fn message_state(&mut self, id: i64) -> Result<MessageState, ClientError> {
        self.step(|ctx| chats::message_state(ctx, id))
    }

    /// If a sent message landed right after the last entry read in its chat, moves the
    /// chat's cursor past it and returns the log: no read after it is needed.
    pub fn pass_own(&mut self, id: i64) -> Result<Option<postern_proto::ids::LogId>, ClientError> {
        self.step(|ctx| chats::pass_own(ctx, id))
    }

    /// The oldest outbox item not in `skip`.
    pub fn next_outbox(&mut self, skip: &[i64]) -> Result<Option<OutboxItem>, ClientError> {
        self.step(|ctx| chats::next_outbox(ctx, skip))
    }

    /// The server acknowledged an outbox item.
    pub fn outbox_done(&mut self, id: i64, seq: Option<u64>) -> Result<(), ClientError> {
        self.step(|ctx| chats::outbox_done(ctx, id, seq))
    }

    /// The server refused an outbox item for good.
    pub fn outbox_failed(&mut self, id: i64) -> Result<Option<Event>, ClientError> {
        self.step(|ctx| chats::outbox_failed(ctx, id))
    }

    /// Every active chat's log and how far it has been read.
    pub fn logs(&mut self) -> Result<Vec<LogCursor>, ClientError> {
        self.step(chats::logs)
    }

    /// Applies one entry of a chat's log; an entry that cannot be opened or applied is
    /// skipped (and reported), never retried forever.
    pub fn receive_entry(
        &mut self,
        log: &postern_proto::ids::LogId,
        seq: u64,
        bytes: &[u8],
    ) -> Result<Vec<Event>, ClientError> {
        match self.step(|ctx| chats::receive_entry(ctx, log, seq, bytes)) {
            Err(e) if entry_at_fault(&e) => {
                self.step(|ctx| chats::skip_entry(ctx, log, seq, bytes))
            }
            other => other,
        }
    }

    /// How far the mailbox has been read.
    pub fn mailbox_cursor(&mut self) -> Result<u64, ClientError> {
        self.step(chats::mailbox_cursor)
    }

    /// Applies one mailbox item; one that cannot be opened or applied is skipped.
    pub fn receive_drop(&mut self, seq: u64, bytes: &[u8]) -> Result<Vec<Event>, ClientError> {
        self.apply_drop(None, seq, bytes)
    }

    /// Applies one item of the mailbox where it was before it moved to the home server
    /// (see [`former_homes_due`](Self::former_homes_due)).
    pub fn receive_former_drop(
        &mut self,
        server: &ServerLink,
        seq: u64,
        bytes: &[u8],
    ) -> Result<Vec<Event>, ClientError> {
        self.apply_drop(Some(&server.to_link_string()), seq, bytes)
    }

    fn apply_drop(
        &mut self,
        former: Option<&str>,
        seq: u64,
        bytes: &[u8],
    ) -> Result<Vec<Event>, ClientError> {
        let applied = self.step(|ctx| {
            if !chats::advance_mailbox_cursor(ctx, former, seq)? {
                return Ok(vec![]);
            }
            chats::receive_drop(ctx, bytes)
        });
        match applied {
            Err(e) if entry_at_fault(&e) => {
                self.step(|ctx| chats::advance_mailbox_cursor(ctx, former, seq))?;
                Ok(vec![])
            }
            other => other,
        }
    }

    /// Contacts, by name.
    pub fn contacts(&self) -> Result<Vec<Contact>, ClientError> {
        chats::contacts(self.store.conn())
    }

    /// Adds a relay this client may go through; returns its id and whether it is new.
    pub fn add_relay(&mut self, link: &RelayLink) -> Result<(i64, bool), ClientError> {
        self.step(|ctx| doors::add(ctx.db, link))
    }

    /// The relays this client may go through.
    pub fn relays(&self) -> Result<Vec<doors::Relay>, ClientError> {
        doors::list(self.store.conn())
    }

    /// Relays to pass on (in an invite): the first few, each with a child credential made
    /// for this occasion (see [`doors::shared`]).
    pub fn relays_to_share(&self) -> Result<Vec<RelayLink>, ClientError> {
        let relays = doors::list(self.store.conn())?;
        Ok(relays
            .into_iter()
            .take(postern_proto::link::MAX_INVITE_RELAYS)
            .map(|r| doors::shared(&r.link))
            .collect())
    }

    /// Relay `id` to pass on to a contact, with a child credential; `None` if unknown.
    pub fn relays_to_share_one(&self, id: i64) -> Result<Option<RelayLink>, ClientError> {
        let relays = doors::list(self.store.conn())?;
        Ok(relays.into_iter().find(|r| r.id == id).map(|r| doors::shared(&r.link)))
    }

    /// Tells the client which network the device is on: `description` is whatever names it
    /// (a Wi-Fi's access point, a carrier, a route and gateway), `None` if it cannot be
    /// told. What the transport learns (the door that opened last, budgets taught by
    /// freezes) is kept per network, since a censor sits on one network and not on the
    /// device. Only a tag is stored, keyed with this device's secret, so the store does not
    /// list the access points it was used on. Returns whether the network differs from the
    /// one named before (in this process).
    pub fn on_network(&mut self, description: Option<&str>) -> Result<bool, ClientError> {
        let tag = description.map(|d| self.identity.network_tag(d)).unwrap_or_default();
        if self.network.as_deref() == Some(tag.as_str()) {
            return Ok(false);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.step(|ctx| doors::seen_network(ctx.db, &tag, now))?;
        let changed = self.network.is_some();
        self.network = Some(tag);
        Ok(changed)
    }

    /// The tag of the network named last ([`on_network`](Self::on_network)): empty if
    /// unknown.
    pub fn network(&self) -> &str {
        self.network.as_deref().unwrap_or_default()
    }

    /// The door that opened last to `server` on this network: `Some(None)` direct,
    /// `Some(Some(id))` relay `id`, `None` unknown.
    pub fn last_door(&self, server: &ServerLink) -> Result<Option<Option<i64>>, ClientError> {
        doors::last(self.store.conn(), self.network(), &server.to_link_string())
    }

    /// Records the door that opened to `server` on this network (`None`: direct).
    pub fn door_opened(
        &mut self,
        server: &ServerLink,
        relay: Option<i64>,
    ) -> Result<(), ClientError> {
        let link = server.to_link_string();
        let outage = moves::outage_since(self.store.conn(), &link)?.is_some();
        if self.last_door(server)? == Some(relay) && !outage {
            return Ok(());
        }
        let network = self.network().to_owned();
        self.step(|ctx| {
            moves::reached(ctx, &link)?;
            doors::opened(ctx.db, &network, &link, relay)
        })
    }

    /// What waits to be sent.
    pub fn queued(&self) -> Result<doors::Queued, ClientError> {
        doors::queued(self.store.conn())
    }

    /// The packet budget learned for a door on this network (see the driver's transport
    /// engine).
    pub fn door_budget(&self, door: &str) -> Result<Option<u32>, ClientError> {
        doors::budget(self.store.conn(), self.network(), door)
    }

    /// Records the packet budget learned for a door on this network.
    pub fn set_door_budget(&mut self, door: &str, packets: u32) -> Result<(), ClientError> {
        let network = self.network().to_owned();
        self.step(|ctx| doors::set_budget(ctx.db, &network, door, packets))
    }

    /// The last probe of a door for a freeze on this network.
    pub fn door_probe(&self, door: &str) -> Result<Option<doors::Probe>, ClientError> {
        doors::probe(self.store.conn(), self.network(), door)
    }

    /// Records a probe of a door for a freeze on this network.
    pub fn set_door_probe(&mut self, door: &str, probe: doors::Probe) -> Result<(), ClientError> {
        let network = self.network().to_owned();
        self.step(|ctx| doors::set_probe(ctx.db, &network, door, probe))
    }

    /// When a door opened connections since `since` (Unix seconds).
    pub fn door_opens(&self, door: &str, since: u64) -> Result<Vec<u64>, ClientError> {
        doors::opens(self.store.conn(), door, since)
    }

    /// Records that a door opened a connection at `at` (Unix seconds), forgetting opens
    /// before `forget_before`.
    pub fn door_opened_at(
        &mut self,
        door: &str,
        at: u64,
        forget_before: u64,
    ) -> Result<(), ClientError> {
        self.step(|ctx| doors::opened_at(ctx.db, door, at, forget_before))
    }

    /// Forgets a relay; whether it was known.
    pub fn remove_relay(&mut self, id: i64) -> Result<bool, ClientError> {
        self.step(|ctx| doors::remove(ctx.db, id))
    }

    /// Chats, oldest first.
    pub fn chats(&mut self) -> Result<Vec<ChatSummary>, ClientError> {
        self.step(chats::chats)
    }

    /// Pending requests to connect.
    pub fn requests(&self) -> Result<Vec<ConnectRequest>, ClientError> {
        chats::requests(self.store.conn())
    }

    /// Chats with a commit of ours acknowledged and not yet resolved: read these logs.
    pub fn unresolved(&mut self) -> Result<Vec<LogCursor>, ClientError> {
        self.step(chats::unresolved)
    }

    /// A contact's card (to claim their key packages and add them to a group).
    pub fn card(&mut self, contact: &str) -> Result<(PublicKey, String, Card), ClientError> {
        self.step(|ctx| groups::card_of(ctx, contact))
    }

    /// `group create`: key packages claimed with each contact's card.
    pub fn group_create(
        &mut self,
        name: &str,
        claimed: Vec<(PublicKey, String, Card, Vec<Vec<u8>>)>,
        rules: GroupRules,
    ) -> Result<(String, String), ClientError> {
        self.step(|ctx| {
            let invitees = claimed
                .into_iter()
                .map(|(identity, name, card, sealed)| {
                    groups::invitee(identity, name, &card, &sealed)
                })
                .collect::<Result<Vec<_>, _>>()?;
            groups::create_group(ctx, name, invitees, rules)
        })
    }

    /// `group add`.
    pub fn group_add(
        &mut self,
        chat: &str,
        claimed: (PublicKey, String, Card, Vec<Vec<u8>>),
    ) -> Result<(), ClientError> {
        let (identity, name, card, sealed) = claimed;
        self.step(|ctx| groups::add(ctx, chat, groups::invitee(identity, name, &card, &sealed)?))
    }

    /// `group remove`.
    pub fn group_remove(&mut self, chat: &str, contact: &str) -> Result<(), ClientError> {
        self.step(|ctx| groups::remove(ctx, chat, contact))
    }

    /// `group leave`.
    pub fn group_leave(&mut self, chat: &str) -> Result<(), ClientError> {
        self.step(|ctx| groups::leave(ctx, chat))
    }

    /// `group members`: the group's name and members.
    pub fn group_members(&mut self, chat: &str) -> Result<(String, Vec<Member>), ClientError> {
        self.step(|ctx| groups::members(ctx, chat))
    }

    /// `servers add`: a server new chats move to when theirs cannot be reached. Returns
    /// whether it is new.
    pub fn add_fallback(&mut self, link: &ServerLink) -> Result<bool, ClientError> {
        self.step(|ctx| moves::add_fallback(ctx, link))
    }

    /// The servers new chats move to, in order.
    pub fn fallbacks(&self) -> Result<Vec<String>, ClientError> {
        moves::fallbacks(self.store.conn())
    }

    /// Every door to `server` failed: records the outage, and returns since when (Unix
    /// seconds) it has lasted.
    pub fn out_of_reach(&mut self, server: &ServerLink, now: u64) -> Result<u64, ClientError> {
        self.step(|ctx| moves::out_of_reach(ctx, &server.to_link_string(), now))
    }

    /// The servers the chats on `server` would move to, in the order their lists name them.
    pub fn successors_of(&mut self, server: &ServerLink) -> Result<Vec<ServerLink>, ClientError> {
        self.step(|ctx| moves::successors_of(ctx, &server.to_link_string()))
    }

    /// Moves the chats on `server` whose next server is `to` there (see `moves.rs`).
    /// Returns the chats moved.
    pub fn fail_over(
        &mut self,
        server: &ServerLink,
        to: &ServerLink,
    ) -> Result<Vec<String>, ClientError> {
        self.step(|ctx| moves::fail_over(ctx, &server.to_link_string(), &to.to_link_string()))
    }

    /// Every door to the home server has failed for the failover time and `to`, a server
    /// of our list, answers: the mailbox moves there and contacts get cards naming it (see
    /// `moves.rs`). The mailbox is published there by the next `publish`.
    pub fn move_home(&mut self, to: &ServerLink) -> Result<Vec<Event>, ClientError> {
        let from = self.server.to_link_string();
        let events = self.step_at(Some(to), |ctx| moves::move_home(ctx, &from))?;
        self.server = to.clone();
        Ok(events)
    }

    /// The servers our mailbox was on before it moved, not read for `every` (or never):
    /// each with how far it was read. Marks them read now.
    pub fn former_homes_due(
        &mut self,
        now: u64,
        every: std::time::Duration,
    ) -> Result<Vec<(ServerLink, u64)>, ClientError> {
        self.step(|ctx| moves::former_homes_due(ctx, now, every.as_secs()))
    }

    /// The server no longer has our mailbox where it was before it moved: stop reading it.
    pub fn forget_former_home(&mut self, server: &ServerLink) -> Result<(), ClientError> {
        self.step(|ctx| moves::forget_former_home(ctx, &server.to_link_string()))
    }

    /// Where each chat with a next server would be if a member moved it in our epoch.
    pub fn successors(&mut self) -> Result<Vec<moves::Successor>, ClientError> {
        self.step(moves::successors)
    }

    /// Another member moved `chat` to its next server: follow it there.
    pub fn follow(&mut self, chat: &str) -> Result<bool, ClientError> {
        self.step(|ctx| moves::follow(ctx, chat))
    }

    /// Members moved `chat` from `epoch`, before ours: it is marked as forked (reported
    /// once), and this device asks to be re-added on their branch when it can ask anyone.
    pub fn moved_without_us(&mut self, chat: &str, epoch: u64) -> Result<Vec<Event>, ClientError> {
        self.step(|ctx| moves::moved_without_us(ctx, chat, epoch))
    }

    /// The servers the active chats are on, and which are out of reach.
    pub fn chat_servers(&self) -> Result<Vec<ChatServer>, ClientError> {
        moves::chat_servers(self.store.conn())
    }

    /// When the successors were last looked for (Unix seconds).
    pub fn last_successor_check(&self) -> Result<Option<u64>, ClientError> {
        moves::last_check(self.store.conn())
    }

    /// Records a look for successors at `now`.
    pub fn successors_checked(&mut self, now: u64) -> Result<(), ClientError> {
        self.step(|ctx| moves::checked(ctx, now))
    }

    /// A chat's epoch and epoch-authenticator tag (members in sync share both).
    pub fn chat_epoch(&mut self, chat: &str) -> Result<(u64, [u8; 8]), ClientError> {
        self.step(|ctx| {
            let row = chats::resolve(ctx, chat)?;
            let keys = mls::epoch_keys(&ctx.mls, &row.group_id)?;
            Ok((keys.epoch, keys.authenticator_tag))
        })
    }

    /// A chat's current log and the keys of its current epoch (tests use them to play a
    /// removed member or a hostile one).
    pub fn chat_keys(
        &mut self,
        chat: &str,
    ) -> Result<(postern_proto::ids::LogId, EpochKeys), ClientError> {
        self.step(|ctx| {
            let row = chats::resolve(ctx, chat)?;
            Ok((row.log, mls::epoch_keys(&ctx.mls, &row.group_id)?))
        })
    }

    /// A chat's messages (the last `limit`), marked as seen.
    pub fn read(
        &mut self,
        chat: &str,
        limit: Option<usize>,
    ) -> Result<Vec<HistoryItem>, ClientError> {
        self.step(|ctx| chats::read(ctx, chat, limit))
    }

    /// The server no longer has a chat's log (it answered "not found" to a read): if we had
    /// read from it before, every entry and key expired while we were away, and this device
    /// asks to be re-added.
    pub fn log_gone(&mut self, chat: &str) -> Result<Vec<Event>, ClientError> {
        self.step(|ctx| gaps::log_gone(ctx, chat))
    }

    /// Queues what keeps quiet chats' logs alive on their servers (call after reading the
    /// logs, so a log found gone is not created again); returns how many requests.
    pub fn keep_alive(&mut self) -> Result<usize, ClientError> {
        self.step(gaps::keep_alive)
    }

    /// Asks again to be re-added to each stale chat whose request went unanswered for
    /// `retry_secs`, the next helpers first (see `gaps`); returns a `Rejoining` per chat asked.
    pub fn ask_again(&mut self, retry_secs: u64) -> Result<Vec<Event>, ClientError> {
        self.step(|ctx| gaps::ask_again(ctx, retry_secs))
    }

    /// Our published mailbox is gone from the server (it expired while we were away): it
    /// will be published again, and read from its new beginning. Drop addresses and claim
    /// tokens registered on it are gone with it.
    pub fn mailbox_lost(&mut self) -> Result<(), ClientError> {
        self.store.mailbox_lost()
    }
}

/// Whether a failure to apply an item from outside is the item's fault (skip it) rather
/// than ours (stop and report).
fn entry_at_fault(e: &ClientError) -> bool {
    matches!(
        e,
        ClientError::Mls(MlsError::Invalid | MlsError::BadCredential | MlsError::UnknownGroup)
            | ClientError::InvalidLink(_)
    )
}

/// A group just created: its id, the commit adding the first members, and their Welcome.
#[derive(Debug, Clone)]
pub struct NewGroup {
    /// The MLS group id (never sent to a server in clear).
    pub group_id: Vec<u8>,
    /// The commit, to append to the group's log.
    pub commit: Vec<u8>,
    /// The Welcome, to drop into the new members' mailboxes after the commit won.
    pub welcome: Vec<u8>,
}

#[cfg(test)]
mod tests;
