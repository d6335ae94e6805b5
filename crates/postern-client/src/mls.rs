//! MLS through openmls, with its state in the client's own SQLite store.
//!
//! **Architecture Invariant:** every MLS operation runs in one SQLite transaction that holds
//! both openmls' state change (through `openmls_sqlite_storage` over the open transaction)
//! and whatever the client stores with it. The group is loaded inside that transaction and
//! dropped with it, so a rolled-back operation leaves no stale in-memory group behind.
//!
//! Groups use suite 0x0001, `PURE_CIPHERTEXT` wire format, the ratchet tree inside the
//! Welcome, and accept messages from up to two past epochs (the server orders but cannot
//! guarantee that everyone sends in the newest epoch). Every member checks every device
//! credential: the leaf's signature key must be the device key its identity signed.

use ed25519_dalek::{Signer as _, SigningKey};
use openmls::prelude::tls_codec::{Deserialize as _, Serialize as _};
use openmls::prelude::*;
use openmls::treesync::EncryptionKey;
use openmls_rust_crypto::RustCrypto;
use openmls_sqlite_storage::{Codec, SqliteStorageProvider};
use openmls_traits::OpenMlsProvider;
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use postern_proto::content::{GroupMeta, ServerList};
use postern_proto::ids::{LogId, PublicKey};
use rand::RngCore;
use rusqlite::Connection;

use crate::identity::{DeviceCredential, Identity};

/// The v1 ciphersuite.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// Past epochs whose application messages are still accepted.
const MAX_PAST_EPOCHS: usize = 2;
/// Application messages are padded to a multiple of this many bytes.
const PADDING: usize = 32;

/// Why an MLS operation failed. Malformed or undecryptable input from others is one coarse
/// variant, so errors are no oracle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MlsError {
    /// Bytes from outside did not parse, decrypt or validate.
    #[error("invalid or undecryptable MLS message")]
    Invalid,
    /// A member's device credential is not signed by its identity, or does not match its
    /// signature key.
    #[error("a device credential does not verify")]
    BadCredential,
    /// No such group in this store.
    #[error("unknown conversation")]
    UnknownGroup,
    /// The database failed.
    #[error("local store: {0}")]
    Store(String),
    /// openmls refused an operation of ours (a bug, or state that changed underneath).
    #[error("MLS: {0}")]
    Library(String),
}

fn lib(e: impl std::fmt::Display) -> MlsError {
    MlsError::Library(e.to_string())
}

/// openmls' values in our store, serialized as JSON (the provider's own convention).
#[derive(Default)]
pub struct JsonCodec;

impl Codec for JsonCodec {
    type Error = serde_json::Error;

    fn to_vec<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, Self::Error> {
        serde_json::to_vec(value)
    }

    fn from_slice<T: serde::de::DeserializeOwned>(slice: &[u8]) -> Result<T, Self::Error> {
        serde_json::from_slice(slice)
    }
}

/// Creates openmls' tables (refinery migrations) in the store.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), MlsError> {
    SqliteStorageProvider::<JsonCodec, &mut Connection>::new(conn)
        .run_migrations()
        .map_err(|e| MlsError::Store(e.to_string()))
}

/// An openmls provider over one open transaction.
pub(crate) struct Provider<'a> {
    crypto: RustCrypto,
    storage: SqliteStorageProvider<JsonCodec, &'a Connection>,
}

impl<'a> Provider<'a> {
    pub(crate) fn new(conn: &'a Connection) -> Self {
        Provider { crypto: RustCrypto::default(), storage: SqliteStorageProvider::new(conn) }
    }
}

impl<'a> OpenMlsProvider for Provider<'a> {
    type CryptoProvider = RustCrypto;
    type RandProvider = RustCrypto;
    type StorageProvider = SqliteStorageProvider<JsonCodec, &'a Connection>;

    fn storage(&self) -> &Self::StorageProvider {
        &self.storage
    }

    fn crypto(&self) -> &Self::CryptoProvider {
        &self.crypto
    }

    fn rand(&self) -> &Self::RandProvider {
        &self.crypto
    }
}

/// The device key as openmls' signer.
pub(crate) struct DeviceSigner<'a>(pub(crate) &'a SigningKey);

impl Signer for DeviceSigner<'_> {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.0.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

pub(crate) fn credential_with_key(identity: &Identity) -> CredentialWithKey {
    let cred = identity.credential();
    CredentialWithKey {
        credential: BasicCredential::new(cred.encode()).into(),
        signature_key: cred.device_key.0.to_vec().into(),
    }
}

/// Checks a member's credential: a Postern device credential whose device key is the leaf's
/// signature key and whose identity signed it. Depends only on the bytes in the group, so
/// every member reaches the same answer.
pub fn check_credential(
    credential: &Credential,
    signature_key: &[u8],
) -> Result<DeviceCredential, MlsError> {
    if credential.credential_type() != CredentialType::Basic {
        return Err(MlsError::BadCredential);
    }
    let device =
        DeviceCredential::decode(credential.serialized_content()).ok_or(MlsError::BadCredential)?;
    if device.device_key.0[..] != *signature_key || !device.verify() {
        return Err(MlsError::BadCredential);
    }
    Ok(device)
}

/// The group context extension with a group's name and rules.
const META: ExtensionType = ExtensionType::Unknown(GroupMeta::EXTENSION_TYPE);
/// The group context extension with the chat's ordered server list.
const SERVERS: ExtensionType = ExtensionType::Unknown(ServerList::EXTENSION_TYPE);

/// What our leaves support beyond the defaults: the group-rules and server-list extensions, and the
/// last-resort marker (a key package's extensions must be among its leaf's capabilities, or
/// every member refuses the package — and first contact after a drained pool fails).
fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        Some(&[META, SERVERS, ExtensionType::LastResort]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

pub(crate) fn create_config() -> MlsGroupCreateConfig {
    create_builder().build()
}

fn create_builder() -> MlsGroupCreateConfigBuilder {
    MlsGroupCreateConfig::builder()
        .capabilities(capabilities())
        .ciphersuite(CIPHERSUITE)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(MAX_PAST_EPOCHS)
        .padding_size(PADDING)
        .sender_ratchet_configuration(SenderRatchetConfiguration::new(32, 1_000))
}

/// The same settings for joining as for creating, so creators and joiners never differ.
fn join_config() -> MlsGroupJoinConfig {
    create_config().join_config().clone()
}

/// A new key package for this device; its private part stays in the store.
pub(crate) fn new_key_package(
    provider: &Provider<'_>,
    identity: &Identity,
    last_resort: bool,
) -> Result<Vec<u8>, MlsError> {
    let mut builder = KeyPackage::builder().leaf_node_capabilities(capabilities());
    if last_resort {
        builder = builder.mark_as_last_resort();
    }
    let bundle = builder
        .build(
            CIPHERSUITE,
            provider,
            &DeviceSigner(&identity.device_key),
            credential_with_key(identity),
        )
        .map_err(lib)?;
    bundle.key_package().tls_serialize_detached().map_err(lib)
}

/// Parses and validates a peer's key package, including its device credential.
pub(crate) fn peer_key_package(
    provider: &Provider<'_>,
    bytes: &[u8],
) -> Result<KeyPackage, MlsError> {
    let kp = KeyPackageIn::tls_deserialize_exact(bytes)
        .map_err(|_| MlsError::Invalid)?
        .validate(provider.crypto(), ProtocolVersion::Mls10)
        .map_err(|_| MlsError::Invalid)?;
    if kp.ciphersuite() != CIPHERSUITE {
        return Err(MlsError::Invalid);
    }
    let leaf = kp.leaf_node();
    check_credential(leaf.credential(), leaf.signature_key().as_slice())?;
    Ok(kp)
}

/// The output of creating a group with its first members.
pub(crate) struct Created {
    pub(crate) group_id: Vec<u8>,
    pub(crate) commit: Vec<u8>,
    pub(crate) welcome: Vec<u8>,
}

/// Creates a group and a pending commit adding `members`. The commit is merged only when it
/// has won its place in the log ([`merge_pending`]). A group with `meta` carries its name
/// and rules in its context; a 1:1 chat has none. A chat with more than one server carries
/// their list, in the order it moves through them.
pub(crate) fn create_group(
    provider: &Provider<'_>,
    identity: &Identity,
    members: &[KeyPackage],
    meta: Option<&GroupMeta>,
    servers: &[String],
) -> Result<Created, MlsError> {
    let mut id = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut id);
    let signer = DeviceSigner(&identity.device_key);
    let mut config = create_builder();
    let mut extensions = Vec::new();
    if let Some(meta) = meta {
        extensions.extend([
            Extension::Unknown(GroupMeta::EXTENSION_TYPE, UnknownExtension(meta.encode())),
            Extension::RequiredCapabilities(RequiredCapabilitiesExtension::new(
                &[META],
                &[],
                &[CredentialType::Basic],
            )),
        ]);
    }
    if servers.len() > 1 {
        let list = ServerList { servers: servers.to_vec() };
        extensions
            .push(Extension::Unknown(ServerList::EXTENSION_TYPE, UnknownExtension(list.encode())));
    }
    if !extensions.is_empty() {
        let extensions = Extensions::from_vec(extensions).map_err(lib)?;
        config = config.with_group_context_extensions(extensions);
    }
    let mut group = MlsGroup::new_with_group_id(
        provider,
        &signer,
        &config.build(),
        GroupId::from_slice(&id),
        credential_with_key(identity),
    )
    .map_err(lib)?;
    let (commit, welcome, _group_info) =
        group.add_members(provider, &signer, members).map_err(lib)?;
    Ok(Created {
        group_id: id.to_vec(),
        commit: commit.tls_serialize_detached().map_err(lib)?,
        welcome: welcome.tls_serialize_detached().map_err(lib)?,
    })
}

fn load(provider: &Provider<'_>, group_id: &[u8]) -> Result<MlsGroup, MlsError> {
    MlsGroup::load(provider.storage(), &GroupId::from_slice(group_id))
        .map_err(|e| MlsError::Store(e.to_string()))?
        .ok_or(MlsError::UnknownGroup)
}

/// Merges our pending commit after it won; returns whether it removed anyone.
pub(crate) fn merge_pending(provider: &Provider<'_>, group_id: &[u8]) -> Result<bool, MlsError> {
    let mut group = load(provider, group_id)?;
    let removed_any =
        group.pending_commit().is_some_and(|staged| !changes(&group, staged).removed.is_empty());
    group.merge_pending_commit(provider).map_err(lib)?;
    Ok(removed_any)
}

/// Joins a group from a Welcome, checking every member's credential.
///
/// A Welcome into a group we already hold replaces our state only with a later epoch,
/// unless `rejoining(group_id)` says we asked to be re-added there: after a fork the
/// branch we are taken back to may be at an epoch ours passed.
pub(crate) fn join(
    provider: &Provider<'_>,
    welcome: &[u8],
    rejoining: impl FnOnce(&[u8]) -> bool,
) -> Result<Joined, MlsError> {
    let welcome = match MlsMessageIn::tls_deserialize_exact(welcome)
        .map_err(|_| MlsError::Invalid)?
        .extract()
    {
        MlsMessageBodyIn::Welcome(w) => w,
        _ => return Err(MlsError::Invalid),
    };
    let processed = ProcessedWelcome::new_from_welcome(provider, &join_config(), welcome)
        .map_err(|_| MlsError::Invalid)?;
    // A Welcome into a group we already hold (we were re-added, or added back after leaving)
    // replaces our state.
    let group_id = processed.unverified_group_info().group_id().clone();
    let last_resort = processed.own_key_package().is_some_and(KeyPackage::last_resort);
    let old = MlsGroup::load(provider.storage(), &group_id)
        .map_err(|e| MlsError::Store(e.to_string()))?;
    let old_epoch = old.as_ref().map(|g| g.epoch().as_u64());
    if let Some(mut old) = old {
        old.delete(provider.storage()).map_err(|e| MlsError::Store(e.to_string()))?;
    }
    let staged = processed.into_staged_welcome(provider, None).map_err(|_| MlsError::Invalid)?;
    if old_epoch.is_some_and(|old| staged.group_context().epoch().as_u64() <= old)
        && !rejoining(group_id.as_slice())
    {
        return Err(MlsError::Invalid);
    }
    let members = staged
        .members()
        .map(|m| check_credential(&m.credential, &m.signature_key))
        .collect::<Result<Vec<_>, _>>()?;
    let group = staged.into_group(provider).map_err(lib)?;
    Ok(Joined {
        group_id: group.group_id().as_slice().to_vec(),
        members,
        replaced: old_epoch.is_some(),
        last_resort,
    })
}

/// A group joined from a Welcome.
pub(crate) struct Joined {
    pub(crate) group_id: Vec<u8>,
    /// Every member's device credential (checked).
    pub(crate) members: Vec<DeviceCredential>,
    /// Whether it replaced the state of a group we already held.
    pub(crate) replaced: bool,
    /// Whether the Welcome was for our last-resort key package, whose init and leaf keys
    /// serve every first contact until it is replaced: our leaf needs an Update at once.
    pub(crate) last_resort: bool,
}

/// Encrypts an application message.
pub(crate) fn encrypt(
    provider: &Provider<'_>,
    identity: &Identity,
    group_id: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, MlsError> {
    let mut group = load(provider, group_id)?;
    let out = group
        .create_message(provider, &DeviceSigner(&identity.device_key), plaintext)
        .map_err(lib)?;
    out.tls_serialize_detached().map_err(lib)
}

/// What processing a message from the log produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// An application message from a member's device.
    Message {
        /// The sender's device credential.
        sender: DeviceCredential,
        /// The plaintext.
        plaintext: Vec<u8>,
    },
    /// A proposal (a member asking to leave), stored until a commit covers it.
    Proposal,
    /// A commit from another member, validated and applied.
    Commit {
        /// It removed us: the chat is over for this device.
        removed_me: bool,
        /// It removed someone (a device whose leaf it replaced does not count): the log
        /// moves to one named by the new epoch.
        removed_any: bool,
        /// It added someone (a re-added device does not count).
        added_any: bool,
    },
}

/// A member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemberInfo {
    pub(crate) leaf: u32,
    pub(crate) credential: DeviceCredential,
    /// The leaf's HPKE key: a re-added device's leaf has a fresh one.
    pub(crate) encryption_key: EncryptionKey,
}

fn member_credential(m: &Member) -> Result<DeviceCredential, MlsError> {
    check_credential(&m.credential, &m.signature_key)
}

/// The group's members, in leaf order.
pub(crate) fn members(
    provider: &Provider<'_>,
    group_id: &[u8],
) -> Result<Vec<MemberInfo>, MlsError> {
    let group = load(provider, group_id)?;
    group
        .members()
        .map(|m| {
            Ok(MemberInfo {
                leaf: m.index.u32(),
                credential: member_credential(&m)?,
                encryption_key: m.encryption_key.clone().into(),
            })
        })
        .collect()
}

/// Our own leaf index.
pub(crate) fn own_leaf(provider: &Provider<'_>, group_id: &[u8]) -> Result<u32, MlsError> {
    Ok(load(provider, group_id)?.own_leaf_index().u32())
}

/// The group's name and rules, if it is a group (1:1 chats have none).
pub(crate) fn group_meta(
    provider: &Provider<'_>,
    group_id: &[u8],
) -> Result<Option<GroupMeta>, MlsError> {
    meta_of(&load(provider, group_id)?)
}

fn meta_of(group: &MlsGroup) -> Result<Option<GroupMeta>, MlsError> {
    group
        .extensions()
        .unknown(GroupMeta::EXTENSION_TYPE)
        .map(|e| GroupMeta::decode(&e.0).map_err(|_| MlsError::Invalid))
        .transpose()
}

/// The chat's servers in the order it moves through them (empty for a chat with one).
pub(crate) fn servers(provider: &Provider<'_>, group_id: &[u8]) -> Result<Vec<String>, MlsError> {
    let group = load(provider, group_id)?;
    let Some(ext) = group.extensions().unknown(ServerList::EXTENSION_TYPE) else {
        return Ok(Vec::new());
    };
    Ok(ServerList::decode(&ext.0).map_err(|_| MlsError::Invalid)?.servers)
}

/// Whether a commit of ours waits for its place in the log.
pub(crate) fn has_pending_commit(
    provider: &Provider<'_>,
    group_id: &[u8],
) -> Result<bool, MlsError> {
    Ok(load(provider, group_id)?.pending_commit().is_some())
}

/// Whether proposals wait for a commit (openmls will not encrypt messages meanwhile).
pub(crate) fn has_pending_proposals(
    provider: &Provider<'_>,
    group_id: &[u8],
) -> Result<bool, MlsError> {
    Ok(load(provider, group_id)?.has_pending_proposals())
}

/// The leaves that stored Remove proposals remove.
fn proposed_removals(group: &MlsGroup) -> Vec<LeafNodeIndex> {
    group
        .pending_proposals()
        .filter_map(|p| match p.proposal() {
            Proposal::Remove(r) => Some(r.removed()),
            _ => None,
        })
        .collect()
}

/// The leaves that stored Remove proposals would remove.
pub(crate) fn proposed_removal_leaves(
    provider: &Provider<'_>,
    group_id: &[u8],
) -> Result<Vec<u32>, MlsError> {
    Ok(proposed_removals(&load(provider, group_id)?).into_iter().map(|l| l.u32()).collect())
}

/// Whether our pending commit still wins where it stands in the log: it covers every Remove
/// proposal seen before it (the rule every member applies to every commit).
pub(crate) fn pending_commit_valid(
    provider: &Provider<'_>,
    group_id: &[u8],
) -> Result<bool, MlsError> {
    let group = load(provider, group_id)?;
    let Some(staged) = group.pending_commit() else { return Ok(false) };
    let removed: Vec<LeafNodeIndex> =
        staged.remove_proposals().map(|r| r.remove_proposal().removed()).collect();
    Ok(proposed_removals(&group).iter().all(|leaf| removed.contains(leaf)))
}

/// Drops our pending commit after it lost its race.
pub(crate) fn clear_pending(provider: &Provider<'_>, group_id: &[u8]) -> Result<(), MlsError> {
    load(provider, group_id)?.clear_pending_commit(provider.storage()).map_err(lib)
}

/// What a commit of ours does besides covering every stored proposal.
#[derive(Default)]
pub(crate) struct CommitPlan {
    /// Key packages to add.
    pub(crate) adds: Vec<KeyPackage>,
    /// Leaves to replace, each by the key package of the same device among `adds`.
    pub(crate) replace: Vec<u32>,
    /// Give our own leaf fresh keys (an Update path), whatever else the commit does.
    pub(crate) self_update: bool,
}

/// A commit doing `plan` and covering every stored proposal (removals among them); returns
/// the commit and the Welcome (when it adds someone). Merged only after it wins.
pub(crate) fn commit(
    provider: &Provider<'_>,
    identity: &Identity,
    group_id: &[u8],
    plan: CommitPlan,
) -> Result<(Vec<u8>, Option<Vec<u8>>), MlsError> {
    let CommitPlan { adds, replace, self_update } = plan;
    let mut group = load(provider, group_id)?;
    let bundle = group
        .commit_builder()
        .force_self_update(self_update)
        .consume_proposal_store(true)
        .propose_removals(replace.into_iter().map(LeafNodeIndex::new))
        .propose_adds(adds)
        .load_psks(provider.storage())
        .map_err(lib)?
        .build(provider.rand(), provider.crypto(), &DeviceSigner(&identity.device_key), |_| true)
        .map_err(lib)?
        .stage_commit(provider)
        .map_err(lib)?;
    let (commit, welcome, _) = bundle.into_contents();
    let welcome = match welcome {
        Some(w) => Some(
            MlsMessageOut::from_welcome(w, ProtocolVersion::Mls10)
                .tls_serialize_detached()
                .map_err(lib)?,
        ),
        None => None,
    };
    Ok((commit.tls_serialize_detached().map_err(lib)?, welcome))
}

/// Test support: a commit whose Update path gives our leaf `other`'s credential and device
/// key, as a hostile member could send.
#[cfg(test)]
pub(crate) fn self_update_as(
    provider: &Provider<'_>,
    identity: &Identity,
    group_id: &[u8],
    other: &Identity,
) -> Result<Vec<u8>, MlsError> {
    let mut group = load(provider, group_id)?;
    let bundle = group
        .self_update_with_new_signer(
            provider,
            &DeviceSigner(&identity.device_key),
            NewSignerBundle {
                signer: &DeviceSigner(&other.device_key),
                credential_with_key: credential_with_key(other),
            },
            LeafNodeParameters::default(),
        )
        .map_err(lib)?;
    bundle.into_contents().0.tls_serialize_detached().map_err(lib)
}

/// A proposal to remove the member at `leaf`. Removals go out as a proposal before their
/// commit, so no commit that leaves them out can win after it (a member who keeps
/// committing is still removed).
pub(crate) fn propose_remove(
    provider: &Provider<'_>,
    identity: &Identity,
    group_id: &[u8],
    leaf: u32,
) -> Result<Vec<u8>, MlsError> {
    let mut group = load(provider, group_id)?;
    let (proposal, _) = group
        .propose_remove_member(
            provider,
            &DeviceSigner(&identity.device_key),
            LeafNodeIndex::new(leaf),
        )
        .map_err(lib)?;
    proposal.tls_serialize_detached().map_err(lib)
}

/// A proposal to remove ourselves, for another member to commit.
pub(crate) fn leave(
    provider: &Provider<'_>,
    identity: &Identity,
    group_id: &[u8],
) -> Result<Vec<u8>, MlsError> {
    let mut group = load(provider, group_id)?;
    let proposal = group.leave_group(provider, &DeviceSigner(&identity.device_key)).map_err(lib)?;
    proposal.tls_serialize_detached().map_err(lib)
}

/// What a commit does to membership, with re-adds told apart: a removed leaf whose device
/// (signature key) comes back in an added key package of the same commit is replaced, not
/// removed. Any member may replace a device's leaf; the group's rules govern the rest.
struct Changes {
    /// Leaves removed for good.
    removed: Vec<LeafNodeIndex>,
    /// Leaves replaced by a fresh leaf of the same device.
    replaced: Vec<LeafNodeIndex>,
    /// Signature keys of the devices that replace them.
    readded: Vec<Vec<u8>>,
}

fn changes(group: &MlsGroup, staged: &StagedCommit) -> Changes {
    let added: Vec<Vec<u8>> = staged
        .add_proposals()
        .map(|a| a.add_proposal().key_package().leaf_node().signature_key().as_slice().to_vec())
        .collect();
    let mut out = Changes { removed: Vec::new(), replaced: Vec::new(), readded: Vec::new() };
    for leaf in staged.remove_proposals().map(|r| r.remove_proposal().removed()) {
        match group.member_at(leaf).filter(|m| added.contains(&m.signature_key)) {
            Some(m) => {
                out.replaced.push(leaf);
                out.readded.push(m.signature_key);
            }
            None => out.removed.push(leaf),
        }
    }
    out
}

/// Whether `sender` may make `proposal` under the group's rules. Depends only on group
/// state, so every member reaches the same answer.
fn allowed(
    group: &MlsGroup,
    meta: Option<&GroupMeta>,
    sender: &Sender,
    proposal: &Proposal,
) -> Result<bool, MlsError> {
    let Sender::Member(leaf) = sender else { return Ok(false) };
    let is_admin = || -> Result<bool, MlsError> {
        let Some(meta) = meta else { return Ok(true) };
        let member = group.member_at(*leaf).ok_or(MlsError::Invalid)?;
        Ok(meta.admins.contains(&member_credential(&member)?.identity_key.0))
    };
    Ok(match proposal {
        Proposal::Add(_) => meta.is_none_or(|m| m.members_can_add) || is_admin()?,
        Proposal::Remove(r) if r.removed() == *leaf => true,
        Proposal::Remove(_) => meta.is_none_or(|m| m.members_can_remove) || is_admin()?,
        Proposal::Update(u) => same_device(group, *leaf, u.leaf_node()),
        Proposal::GroupContextExtensions(_) => is_admin()?,
        _ => false,
    })
}

/// Whether `new` (a member's fresh leaf, from an Update) keeps the member's device: the same
/// credential and signature key. New leaf keys, never a new identity or device.
fn same_device(group: &MlsGroup, leaf: LeafNodeIndex, new: &LeafNode) -> bool {
    group.member_at(leaf).is_some_and(|m| {
        m.credential == *new.credential() && m.signature_key == new.signature_key().as_slice()
    })
}

/// Decrypts and applies a message from the group's log. A commit is applied only if it is
/// valid for every member alike: sent by a member (no external commits), every proposal
/// allowed by the group's rules, every added credential valid, the committer's fresh leaf
/// (if any) still its own device, and every Remove proposal stored before it covered.
pub(crate) fn receive(
    provider: &Provider<'_>,
    group_id: &[u8],
    message: &[u8],
) -> Result<Received, MlsError> {
    let mut group = load(provider, group_id)?;
    let msg = MlsMessageIn::tls_deserialize_exact(message).map_err(|_| MlsError::Invalid)?;
    let protocol = msg.try_into_protocol_message().map_err(|_| MlsError::Invalid)?;
    let processed = group.process_message(provider, protocol).map_err(|_| MlsError::Invalid)?;
    let sender_credential = processed.credential().clone();
    let sender = processed.sender().clone();
    let meta = meta_of(&group)?;
    match processed.into_content() {
        ProcessedMessageContent::ApplicationMessage(app) => {
            let sender = DeviceCredential::decode(sender_credential.serialized_content())
                .ok_or(MlsError::BadCredential)?;
            if !sender.verify() {
                return Err(MlsError::BadCredential);
            }
            Ok(Received::Message { sender, plaintext: app.into_bytes() })
        }
        ProcessedMessageContent::ProposalMessage(proposal) => {
            if !allowed(&group, meta.as_ref(), proposal.sender(), proposal.proposal())? {
                return Err(MlsError::Invalid);
            }
            group.store_pending_proposal(provider.storage(), *proposal).map_err(lib)?;
            Ok(Received::Proposal)
        }
        ProcessedMessageContent::StagedCommitMessage(staged) => {
            let Sender::Member(committer) = sender else { return Err(MlsError::Invalid) };
            if staged.update_path_leaf_node().is_some_and(|n| !same_device(&group, committer, n)) {
                return Err(MlsError::Invalid);
            }
            let changes = changes(&group, &staged);
            for queued in staged.queued_proposals() {
                let readd = match queued.proposal() {
                    Proposal::Remove(r) => changes.replaced.contains(&r.removed()),
                    Proposal::Add(a) => changes
                        .readded
                        .iter()
                        .any(|k| k == a.key_package().leaf_node().signature_key().as_slice()),
                    _ => false,
                };
                if !readd && !allowed(&group, meta.as_ref(), queued.sender(), queued.proposal())? {
                    return Err(MlsError::Invalid);
                }
            }
            let mut added_any = false;
            for add in staged.add_proposals() {
                let leaf = add.add_proposal().key_package().leaf_node();
                check_credential(leaf.credential(), leaf.signature_key().as_slice())?;
                added_any |= !changes.readded.iter().any(|k| k == leaf.signature_key().as_slice());
            }
            let covered = |leaf: &LeafNodeIndex| {
                changes.removed.contains(leaf) || changes.replaced.contains(leaf)
            };
            if !proposed_removals(&group).iter().all(covered) {
                return Err(MlsError::Invalid);
            }
            let removed_me = staged.self_removed();
            group.merge_staged_commit(provider, *staged).map_err(lib)?;
            Ok(Received::Commit { removed_me, removed_any: !changes.removed.is_empty(), added_any })
        }
        _ => Err(MlsError::Invalid),
    }
}

/// What members derive from the current epoch, and the server never learns from them.
pub struct EpochKeys {
    /// The log id this epoch derives. A chat's log is named by the epoch that created it
    /// (and, later, by the epoch after a removal); other epochs keep using that log.
    pub log_id: LogId,
    /// The key that signs this epoch's appends.
    pub append_key: SigningKey,
    /// The AEAD key for envelopes.
    pub envelope_key: [u8; 32],
    /// The group's epoch.
    pub epoch: u64,
    /// The first 8 bytes of a hash of the epoch authenticator (fork detection).
    pub authenticator_tag: [u8; 8],
}

impl std::fmt::Debug for EpochKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochKeys")
            .field("log_id", &self.log_id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl EpochKeys {
    /// The append key's public half, as registered with the server.
    pub fn append_public(&self) -> PublicKey {
        PublicKey(self.append_key.verifying_key().to_bytes())
    }

    /// The log a chat moves to on the server at `index` of its list when it leaves its
    /// server in this epoch: every member in the epoch derives the same id, no server can.
    /// Derived from the append secret, which the client keeps for past epochs too.
    pub fn successor_log(&self, index: usize) -> Result<LogId, MlsError> {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(None, &self.append_key.to_bytes());
        let mut id = [0u8; 32];
        let info = [b"postern/successor-log/".as_slice(), &(index as u64).to_be_bytes()].concat();
        hk.expand(&info, &mut id).map_err(|_| MlsError::Library("HKDF length".into()))?;
        Ok(LogId(id))
    }
}

/// Derives the epoch's keys from its exporter secret and epoch authenticator.
fn derive_keys(
    export: impl Fn(&str) -> Result<Vec<u8>, MlsError>,
    epoch: u64,
    authenticator: &[u8],
) -> Result<EpochKeys, MlsError> {
    use sha2::Digest;
    let export32 = |label: &str| -> Result<[u8; 32], MlsError> {
        export(label)?.try_into().map_err(|_| MlsError::Library("exporter length".into()))
    };
    let digest = sha2::Sha256::digest(authenticator);
    let mut authenticator_tag = [0u8; 8];
    authenticator_tag.copy_from_slice(&digest[..8]);
    Ok(EpochKeys {
        log_id: LogId(export32("postern/log-id")?),
        append_key: SigningKey::from_bytes(&export32("postern/append")?),
        envelope_key: export32("postern/envelope")?,
        epoch,
        authenticator_tag,
    })
}

/// The current epoch's derived keys.
pub(crate) fn epoch_keys(provider: &Provider<'_>, group_id: &[u8]) -> Result<EpochKeys, MlsError> {
    current_keys(provider, &load(provider, group_id)?)
}

fn current_keys(provider: &Provider<'_>, group: &MlsGroup) -> Result<EpochKeys, MlsError> {
    derive_keys(
        |label| group.export_secret(provider.crypto(), label, b"", 32).map_err(lib),
        group.epoch().as_u64(),
        group.epoch_authenticator().as_slice(),
    )
}

/// What [`crate::groups::pump`] decides on, from one load of the group: `None` while our
/// commit is pending, else the epoch's keys and whether proposals wait for a commit.
pub(crate) fn pump_state(
    provider: &Provider<'_>,
    group_id: &[u8],
) -> Result<Option<(EpochKeys, bool)>, MlsError> {
    let group = load(provider, group_id)?;
    if group.pending_commit().is_some() {
        return Ok(None);
    }
    Ok(Some((current_keys(provider, &group)?, group.has_pending_proposals())))
}

/// The keys of the epoch our pending commit creates, before it is merged: the commit's
/// envelope carries that epoch's append key.
pub(crate) fn pending_epoch_keys(
    provider: &Provider<'_>,
    group_id: &[u8],
) -> Result<EpochKeys, MlsError> {
    let group = load(provider, group_id)?;
    let staged = group.pending_commit().ok_or(MlsError::Library("no pending commit".into()))?;
    let authenticator = staged
        .epoch_authenticator()
        .ok_or(MlsError::Library("the pending commit removes us".into()))?;
    derive_keys(
        |label| staged.export_secret(provider.crypto(), label, b"", 32).map_err(lib),
        group.epoch().as_u64() + 1,
        authenticator.as_slice(),
    )
}
