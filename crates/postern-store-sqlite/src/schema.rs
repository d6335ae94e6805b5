//! The schema, its migrations, and the expiry sweep.
//!
//! Every table and column here is listed in `docs/server-disclosure.md`; a test fails when one
//! is not.

use postern_store::{Day, StoreError, Swept};
use rusqlite::{Connection, params};

use crate::backend;

/// Migrations in order; `PRAGMA user_version` is the number applied.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE mailboxes (
    id          BLOB PRIMARY KEY,
    owner_key   BLOB NOT NULL,
    next_seq    INTEGER NOT NULL,
    expires_day INTEGER NOT NULL
);
CREATE TABLE drops (
    id      BLOB PRIMARY KEY,
    mailbox BLOB NOT NULL,
    bytes   INTEGER NOT NULL
);
CREATE INDEX drops_by_mailbox ON drops (mailbox);
CREATE TABLE mailbox_items (
    mailbox     BLOB NOT NULL,
    seq         INTEGER NOT NULL,
    drop_id     BLOB NOT NULL,
    idem        BLOB NOT NULL,
    data        BLOB NOT NULL,
    expires_day INTEGER NOT NULL,
    UNIQUE (mailbox, seq),
    UNIQUE (drop_id, idem)
);
CREATE INDEX mailbox_items_by_expiry ON mailbox_items (expires_day);
CREATE TABLE key_packages (
    id          INTEGER PRIMARY KEY,
    mailbox     BLOB NOT NULL,
    device      BLOB NOT NULL,
    last_resort INTEGER NOT NULL,
    data        BLOB NOT NULL
);
CREATE INDEX key_packages_by_owner ON key_packages (mailbox, device, last_resort);
CREATE TABLE claim_tokens (
    hash        BLOB PRIMARY KEY,
    mailbox     BLOB NOT NULL,
    per_day     INTEGER NOT NULL,
    used_day    INTEGER NOT NULL,
    used_count  INTEGER NOT NULL,
    expires_day INTEGER NOT NULL
);
CREATE TABLE logs (
    id       BLOB PRIMARY KEY,
    next_seq INTEGER NOT NULL,
    bytes    INTEGER NOT NULL,
    keys     INTEGER NOT NULL
);
CREATE TABLE log_keys (
    log         BLOB NOT NULL,
    key_id      BLOB NOT NULL,
    key         BLOB NOT NULL,
    expires_day INTEGER NOT NULL,
    PRIMARY KEY (log, key_id)
);
CREATE TABLE entries (
    log         BLOB NOT NULL,
    seq         INTEGER NOT NULL,
    idem        BLOB NOT NULL,
    data        BLOB NOT NULL,
    expires_day INTEGER NOT NULL,
    UNIQUE (log, seq),
    UNIQUE (log, idem)
);
CREATE INDEX entries_by_expiry ON entries (expires_day);
CREATE TABLE uploads (
    id          BLOB NOT NULL,
    offset      INTEGER NOT NULL,
    data        BLOB NOT NULL,
    total_len   INTEGER NOT NULL,
    expires_day INTEGER NOT NULL,
    PRIMARY KEY (id, offset)
);
"#];

/// Brings the schema up to date in one transaction.
pub(crate) fn migrate(conn: &Connection) -> Result<(), StoreError> {
    let version: usize =
        conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(backend)?;
    if version > MIGRATIONS.len() {
        return Err(StoreError::Backend(format!(
            "database schema {version} is newer than this build ({})",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        conn.execute_batch(&format!("BEGIN; {sql}; PRAGMA user_version = {}; COMMIT;", i + 1))
            .map_err(backend)?;
    }
    Ok(())
}

/// Deletes everything whose expiry day is before `today`, keeping the counters in step.
pub(crate) fn sweep(c: &Connection, today: Day) -> Result<Swept, StoreError> {
    let run = |sql: &str| c.execute(sql, params![today]).map_err(backend);
    let mut swept = Swept::default();

    run("UPDATE logs SET bytes = bytes - (SELECT coalesce(sum(length(data)), 0) FROM entries
         WHERE entries.log = logs.id AND expires_day < ?1)")?;
    swept.entries = run("DELETE FROM entries WHERE expires_day < ?1")? as u64;
    let mut other = run("DELETE FROM log_keys WHERE expires_day < ?1")?;
    c.execute("UPDATE logs SET keys = (SELECT count(*) FROM log_keys WHERE log = logs.id)", [])
        .map_err(backend)?;
    other += c
        .execute(
            "DELETE FROM logs WHERE keys = 0 AND NOT EXISTS (SELECT 1 FROM entries WHERE log = logs.id)",
            [],
        )
        .map_err(backend)?;

    run(
        "UPDATE drops SET bytes = bytes - (SELECT coalesce(sum(length(data)), 0) FROM mailbox_items
         WHERE drop_id = drops.id AND expires_day < ?1)",
    )?;
    swept.items = run("DELETE FROM mailbox_items WHERE expires_day < ?1")? as u64;
    for table in ["mailbox_items", "drops", "key_packages", "claim_tokens"] {
        other += run(&format!(
            "DELETE FROM {table} WHERE mailbox IN (SELECT id FROM mailboxes WHERE expires_day < ?1)"
        ))?;
    }
    other += run("DELETE FROM mailboxes WHERE expires_day < ?1")?;
    other += run("DELETE FROM claim_tokens WHERE expires_day < ?1")?;
    other += run("DELETE FROM uploads WHERE expires_day < ?1")?;
    swept.other = other as u64;
    Ok(swept)
}

/// Every `(table, column)` of the schema, for the disclosure test.
pub fn columns(conn: &Connection) -> Result<Vec<(String, String)>, StoreError> {
    let mut tables = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' ORDER BY name")
        .map_err(backend)?;
    let names: Vec<String> = tables
        .query_map([], |r| r.get(0))
        .map_err(backend)?
        .collect::<Result<_, _>>()
        .map_err(backend)?;
    let mut out = Vec::new();
    for table in names {
        let mut cols =
            conn.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid").map_err(backend)?;
        let rows = cols.query_map([&table], |r| r.get::<_, String>(0)).map_err(backend)?;
        for col in rows {
            out.push((table.clone(), col.map_err(backend)?));
        }
    }
    Ok(out)
}
