//! The local store: one SQLCipher database per home, encrypted with a key from
//! `POSTERN_PASSPHRASE` or from a key file readable only by the user.
//!
//! What this does not protect against: with a key file, anyone who can read the home (a
//! stolen unlocked laptop, a backup of the whole directory, malware running as the user) can
//! read the store; the key file only keeps the database unreadable when copied alone. A
//! passphrase protects a stolen device at rest, as long as the passphrase is strong.

use std::io::Write;
use std::path::Path;

use ed25519_dalek::SigningKey;
use postern_proto::link::ServerLink;
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use zeroize::Zeroizing;

use crate::identity::Identity;
use crate::{ClientError, io_err};

pub(crate) const DATABASE: &str = "client.db";
const KEY_FILE: &str = "store.key";

/// Where the store's key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A passphrase (from `POSTERN_PASSPHRASE`); SQLCipher derives the key with PBKDF2.
    Passphrase(Zeroizing<String>),
    /// A random key in `store.key` in the home, created at `init`.
    KeyFile,
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Passphrase(_) => f.write_str("Passphrase(<redacted>)"),
            KeySource::KeyFile => f.write_str("KeyFile"),
        }
    }
}

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE identity (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    name            TEXT NOT NULL,
    identity_secret BLOB NOT NULL,
    device_secret   BLOB NOT NULL,
    device_id       BLOB NOT NULL,
    server_link     TEXT NOT NULL
);
"#,
    r#"
CREATE TABLE mailbox (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    mailbox_id   BLOB NOT NULL,
    owner_secret BLOB NOT NULL,
    kp_key       BLOB NOT NULL,
    published    INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE mailbox ADD COLUMN hpke_private BLOB;
ALTER TABLE mailbox ADD COLUMN hpke_public BLOB;
CREATE TABLE invites (
    drop_id BLOB PRIMARY KEY,
    token   BLOB NOT NULL,
    kind    TEXT NOT NULL,
    expires INTEGER NOT NULL
);
"#,
    crate::chats::MIGRATION,
    crate::chats::MIGRATION_GROUPS,
    crate::gaps::MIGRATION_GAPS,
    crate::doors::MIGRATION_RELAYS,
    crate::moves::MIGRATION_MOVES,
    crate::doors::MIGRATION_NETWORKS,
    crate::moves::MIGRATION_FORKS,
    crate::chats::MIGRATION_CONTROLS,
    crate::moves::MIGRATION_HOMES,
    crate::chats::MIGRATION_QUEUED,
    crate::gaps::MIGRATION_REJOIN_ASKS,
];

/// Prepared statements a client's connection keeps.
const STATEMENT_CACHE: usize = 128;

#[derive(Debug)]
pub(crate) struct Store {
    conn: Connection,
}

fn db_err(e: rusqlite::Error) -> ClientError {
    ClientError::Store(e.to_string())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SQLCipher key argument: the passphrase, or a raw key as `x'…'`.
fn key_value(home: &Path, key: &KeySource, create: bool) -> Result<Zeroizing<String>, ClientError> {
    match key {
        KeySource::Passphrase(p) => Ok(p.clone()),
        KeySource::KeyFile => {
            let path = home.join(KEY_FILE);
            let raw = if create {
                let mut raw = Zeroizing::new([0u8; 32]);
                rand::rngs::OsRng.fill_bytes(raw.as_mut());
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.write_all(raw.as_ref()).and_then(|()| f.sync_all()).map_err(io_err(&path))?;
                raw.to_vec()
            } else {
                match std::fs::read(&path) {
                    Ok(raw) => raw,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(ClientError::PassphraseRequired(home.to_owned()));
                    }
                    Err(e) => return Err(io_err(&path)(e)),
                }
            };
            let raw = Zeroizing::new(raw);
            if raw.len() != 32 {
                return Err(ClientError::WrongKey(home.to_owned()));
            }
            Ok(Zeroizing::new(format!("x'{}'", hex(&raw))))
        }
    }
}

impl Store {
    fn connect(home: &Path, key: &KeySource, create: bool) -> Result<Self, ClientError> {
        let path = home.join(DATABASE);
        let key = key_value(home, key, create)?;
        let flags = if create {
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        } else {
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        };
        let conn = Connection::open_with_flags(&path, flags).map_err(db_err)?;
        conn.pragma_update(None, "key", key.as_str()).map_err(db_err)?;
        // SQLCipher logs a wrong key to stderr itself; our error says it once, plainly.
        conn.pragma_update(None, "cipher_log_level", "NONE").map_err(db_err)?;
        // The first read tells whether the key is right (or the file is a database at all).
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0))
            .map_err(|_| ClientError::WrongKey(home.to_owned()))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(db_err)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db_err)?;
        // Room for every statement the client and openmls' store run (about 90), so that
        // none is parsed again.
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        let mut store = Store { conn };
        store.migrate()?;
        crate::mls::migrate(&mut store.conn)?;
        Ok(store)
    }

    pub(crate) fn create(home: &Path, key: &KeySource) -> Result<Self, ClientError> {
        Self::connect(home, key, true)
    }

    pub(crate) fn open(home: &Path, key: &KeySource) -> Result<Self, ClientError> {
        Self::connect(home, key, false)
    }

    fn migrate(&self) -> Result<(), ClientError> {
        let version: usize =
            self.conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(db_err)?;
        if version > MIGRATIONS.len() {
            return Err(ClientError::Store(format!(
                "the local store has schema {version}, newer than this build ({})",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            self.conn
                .execute_batch(&format!("BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;", i + 1))
                .map_err(db_err)?;
        }
        Ok(())
    }

    pub(crate) fn transaction(&mut self) -> Result<rusqlite::Transaction<'_>, ClientError> {
        self.conn.transaction().map_err(db_err)
    }

    pub(crate) fn save_mailbox(&self, m: &crate::MailboxKeys) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT INTO mailbox (id, mailbox_id, owner_secret, kp_key, published) VALUES (1, ?1, ?2, ?3, 0)",
                params![&m.mailbox.0[..], &m.owner.to_bytes()[..], &m.kp_key[..]],
            )
            .map_err(db_err)?;
        Ok(())
    }

    /// The mailbox, or `None` in a home made before mailboxes existed.
    pub(crate) fn load_mailbox(&self) -> Result<Option<(crate::MailboxKeys, bool)>, ClientError> {
        read_mailbox(&self.conn)
    }

    /// The mailbox's HPKE (X25519) key pair, made on first use.
    pub(crate) fn hpke_keypair(&self) -> Result<([u8; 32], [u8; 32]), ClientError> {
        hpke_keypair(&self.conn)
    }

    pub(crate) fn set_hpke_keypair(
        &self,
        private: &[u8; 32],
        public: &[u8; 32],
    ) -> Result<(), ClientError> {
        write_hpke(&self.conn, private, public)
    }

    /// The connection, for reads outside a transaction.
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    pub(crate) fn save_invite(
        &self,
        drop: &[u8; 32],
        token: &[u8; 32],
        kind: &str,
        expires: u32,
    ) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT INTO invites (drop_id, token, kind, expires) VALUES (?1, ?2, ?3, ?4)",
                params![&drop[..], &token[..], kind, expires],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub(crate) fn mailbox_lost(&self) -> Result<(), ClientError> {
        self.conn
            .execute("UPDATE mailbox SET published = 0, fetched = 0 WHERE id = 1", [])
            .map_err(db_err)?;
        Ok(())
    }

    pub(crate) fn mark_published(&self) -> Result<(), ClientError> {
        self.conn.execute("UPDATE mailbox SET published = 1 WHERE id = 1", []).map_err(db_err)?;
        Ok(())
    }

    pub(crate) fn save_identity(
        &self,
        id: &Identity,
        server: &ServerLink,
    ) -> Result<(), ClientError> {
        self.conn
            .execute(
                "INSERT INTO identity (id, name, identity_secret, device_secret, device_id, server_link)
                 VALUES (1, ?1, ?2, ?3, ?4, ?5)",
                params![
                    id.name,
                    &id.identity_key.to_bytes()[..],
                    &id.device_key.to_bytes()[..],
                    &id.device_id[..],
                    Zeroizing::new(server.to_link_string()).as_str(),
                ],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub(crate) fn load_identity(&self) -> Result<(Identity, ServerLink), ClientError> {
        type Row = (String, Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>, Vec<u8>, Zeroizing<String>);
        let row: Option<Row> = self
            .conn
            .query_row(
                "SELECT name, identity_secret, device_secret, device_id, server_link FROM identity WHERE id = 1",
                [],
                |r| {
                    Ok((
                        r.get(0)?,
                        Zeroizing::new(r.get(1)?),
                        Zeroizing::new(r.get(2)?),
                        r.get(3)?,
                        Zeroizing::new(r.get(4)?),
                    ))
                },
            )
            .optional()
            .map_err(db_err)?;
        let (name, identity_secret, device_secret, device_id, link) =
            row.ok_or(ClientError::Internal("the store has no identity"))?;
        let secret = |bytes: &[u8]| -> Result<SigningKey, ClientError> {
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| ClientError::Internal("stored key has the wrong size"))?;
            Ok(SigningKey::from_bytes(&arr))
        };
        let identity = Identity {
            name,
            identity_key: secret(&identity_secret)?,
            device_key: secret(&device_secret)?,
            device_id: device_id
                .try_into()
                .map_err(|_| ClientError::Internal("stored device id has the wrong size"))?,
        };
        Ok((identity, ServerLink::parse(&link)?))
    }
}

/// The mailbox, or `None` in a home made before mailboxes existed.
pub(crate) fn read_mailbox(
    conn: &Connection,
) -> Result<Option<(crate::MailboxKeys, bool)>, ClientError> {
    type Row = (Vec<u8>, Zeroizing<Vec<u8>>, Zeroizing<Vec<u8>>, bool);
    let row: Option<Row> = conn
        .query_row(
            "SELECT mailbox_id, owner_secret, kp_key, published FROM mailbox WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, Zeroizing::new(r.get(1)?), Zeroizing::new(r.get(2)?), r.get(3)?)),
        )
        .optional()
        .map_err(db_err)?;
    let Some((id, owner, kp_key, published)) = row else { return Ok(None) };
    let bad = || ClientError::Internal("stored mailbox has the wrong size");
    let owner: [u8; 32] = owner.as_slice().try_into().map_err(|_| bad())?;
    Ok(Some((
        crate::MailboxKeys {
            mailbox: postern_proto::ids::MailboxId(id.try_into().map_err(|_| bad())?),
            owner: SigningKey::from_bytes(&owner),
            kp_key: kp_key.as_slice().try_into().map_err(|_| bad())?,
        },
        published,
    )))
}

/// The mailbox's HPKE (X25519) key pair, made on first use.
pub(crate) fn hpke_keypair(conn: &Connection) -> Result<([u8; 32], [u8; 32]), ClientError> {
    let stored: (Option<Zeroizing<Vec<u8>>>, Option<Vec<u8>>) = conn
        .query_row("SELECT hpke_private, hpke_public FROM mailbox WHERE id = 1", [], |r| {
            Ok((r.get::<_, Option<Vec<u8>>>(0)?.map(Zeroizing::new), r.get(1)?))
        })
        .map_err(db_err)?;
    let bad = || ClientError::Internal("stored HPKE key has the wrong size");
    if let (Some(private), Some(public)) = stored {
        return Ok((
            private.as_slice().try_into().map_err(|_| bad())?,
            public.try_into().map_err(|_| bad())?,
        ));
    }
    let kp = postern_proto::session::StaticKeypair::generate()
        .map_err(|_| ClientError::Internal("cannot generate an X25519 key"))?;
    write_hpke(conn, &kp.private, &kp.public)?;
    Ok((kp.private, kp.public))
}

fn write_hpke(conn: &Connection, private: &[u8; 32], public: &[u8; 32]) -> Result<(), ClientError> {
    conn.execute(
        "UPDATE mailbox SET hpke_private = ?1, hpke_public = ?2 WHERE id = 1",
        params![&private[..], &public[..]],
    )
    .map_err(db_err)?;
    Ok(())
}
