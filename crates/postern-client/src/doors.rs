//! The doors this client knows besides the direct one: relays, each by its link
//! (`postern://relay#…`, which holds the credential's secret, so it lives only in the
//! encrypted store). The driver tries them when the server does not answer directly.

use postern_proto::link::RelayLink;
use rusqlite::{Connection, OptionalExtension, params};

use crate::ClientError;

pub(crate) const MIGRATION_RELAYS: &str = r#"
CREATE TABLE relays (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    link  TEXT NOT NULL UNIQUE
);
"#;

fn db_err(e: rusqlite::Error) -> ClientError {
    ClientError::Store(e.to_string())
}

/// A relay the client holds a link for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// Its number, for `remove`.
    pub id: i64,
    /// The link.
    pub link: RelayLink,
}

/// Adds a relay; returns its id and whether it is new.
pub(crate) fn add(db: &Connection, link: &RelayLink) -> Result<(i64, bool), ClientError> {
    let text = link.to_link_string();
    let existing: Option<i64> = db
        .query_row("SELECT id FROM relays WHERE link = ?1", params![text], |r| r.get(0))
        .optional()
        .map_err(db_err)?;
    if let Some(id) = existing {
        return Ok((id, false));
    }
    db.execute("INSERT INTO relays (link) VALUES (?1)", params![text]).map_err(db_err)?;
    Ok((db.last_insert_rowid(), true))
}

/// Every relay, in the order they were added.
pub(crate) fn list(db: &Connection) -> Result<Vec<Relay>, ClientError> {
    let mut stmt = db.prepare("SELECT id, link FROM relays ORDER BY id").map_err(db_err)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .map_err(db_err)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, text) = row.map_err(db_err)?;
        // Written by `add` from a parsed link; a row that no longer parses is skipped.
        if let Ok(link) = RelayLink::parse(&text) {
            out.push(Relay { id, link });
        }
    }
    Ok(out)
}

/// Removes a relay; whether it existed.
pub(crate) fn remove(db: &Connection, id: i64) -> Result<bool, ClientError> {
    Ok(db.execute("DELETE FROM relays WHERE id = ?1", params![id]).map_err(db_err)? > 0)
}
