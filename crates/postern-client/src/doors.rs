//! The doors this client knows besides the direct one: relays, each by its link
//! (`postern://relay#…`, which holds the credential's secret, so it lives only in the
//! encrypted store). The driver tries them when the server does not answer directly.
//!
//! What the transport engine learns is kept per network (a censor sits on one network,
//! not on the device): per server, the door that opened last, so the next process tries it
//! first; and per door, the packet budget a freeze taught. A network is named by a keyed
//! hash of what the platform says of it (see `Client::on_network`); the rows of networks
//! not seen among the [`MAX_NETWORKS`] most recent ones are forgotten. Rows learned before
//! networks were told apart, or where the network cannot be told, are under `''`.

use postern_proto::link::RelayLink;
use rusqlite::{Connection, OptionalExtension, params};

use crate::ClientError;

pub(crate) const MIGRATION_RELAYS: &str = r#"
CREATE TABLE relays (
    id    INTEGER PRIMARY KEY AUTOINCREMENT,
    link  TEXT NOT NULL UNIQUE
);
CREATE TABLE last_doors (
    server TEXT PRIMARY KEY,
    relay  INTEGER
);
CREATE TABLE door_budgets (
    door    TEXT PRIMARY KEY,
    packets INTEGER NOT NULL
);
CREATE TABLE door_opens (
    door TEXT NOT NULL,
    at   INTEGER NOT NULL
);
"#;

/// Keeps the door memory per network; what was learned before goes under the unknown
/// network (`''`).
pub(crate) const MIGRATION_NETWORKS: &str = r#"
CREATE TABLE networks (
    tag  TEXT PRIMARY KEY,
    seen INTEGER NOT NULL
);
CREATE TABLE network_doors (
    network TEXT NOT NULL,
    server  TEXT NOT NULL,
    relay   INTEGER,
    PRIMARY KEY (network, server)
);
INSERT INTO network_doors (network, server, relay) SELECT '', server, relay FROM last_doors;
DROP TABLE last_doors;
CREATE TABLE network_budgets (
    network TEXT NOT NULL,
    door    TEXT NOT NULL,
    packets INTEGER NOT NULL,
    PRIMARY KEY (network, door)
);
INSERT INTO network_budgets (network, door, packets)
    SELECT '', door, packets FROM door_budgets;
DROP TABLE door_budgets;
CREATE TABLE network_probes (
    network TEXT NOT NULL,
    door    TEXT NOT NULL,
    at      INTEGER NOT NULL,
    froze   INTEGER NOT NULL,
    PRIMARY KEY (network, door)
);
"#;

/// How many networks' door memory is kept (the most recently seen).
pub(crate) const MAX_NETWORKS: usize = 32;

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
    let mut stmt = db.prepare_cached("SELECT id, link FROM relays ORDER BY id").map_err(db_err)?;
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

/// The link to give someone else: a child credential made for this occasion, so a leaked
/// copy can be revoked without cutting us off. A credential already at the deepest level is
/// passed on as it is.
pub fn shared(link: &RelayLink) -> RelayLink {
    use rand::RngCore;
    let mut id = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id);
    link.child(id).unwrap_or_else(|| link.clone())
}

/// Removes a relay; whether it existed.
pub(crate) fn remove(db: &Connection, id: i64) -> Result<bool, ClientError> {
    Ok(db.execute("DELETE FROM relays WHERE id = ?1", params![id]).map_err(db_err)? > 0)
}

/// The door that opened last to `server` on `network`: `Some(None)` direct,
/// `Some(Some(id))` a relay, `None` unknown (or a relay since removed).
pub(crate) fn last(
    db: &Connection,
    network: &str,
    server: &str,
) -> Result<Option<Option<i64>>, ClientError> {
    db.query_row(
        "SELECT l.relay FROM network_doors l
         WHERE l.network = ?1 AND l.server = ?2
           AND (l.relay IS NULL OR l.relay IN (SELECT id FROM relays))",
        params![network, server],
        |r| r.get::<_, Option<i64>>(0),
    )
    .optional()
    .map_err(db_err)
}

/// Records the door that opened to `server` on `network`.
pub(crate) fn opened(
    db: &Connection,
    network: &str,
    server: &str,
    relay: Option<i64>,
) -> Result<(), ClientError> {
    db.execute(
        "INSERT INTO network_doors (network, server, relay) VALUES (?1, ?2, ?3)
         ON CONFLICT (network, server) DO UPDATE SET relay = excluded.relay",
        params![network, server, relay],
    )
    .map_err(db_err)?;
    Ok(())
}

/// Marks `network` seen at `now` (Unix seconds) and forgets what was learned on networks
/// no longer among the [`MAX_NETWORKS`] seen last.
pub(crate) fn seen_network(db: &Connection, network: &str, now: u64) -> Result<(), ClientError> {
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let keep = i64::try_from(MAX_NETWORKS).unwrap_or(i64::MAX);
    db.execute(
        "INSERT INTO networks (tag, seen) VALUES (?1, ?2)
         ON CONFLICT (tag) DO UPDATE SET seen = excluded.seen",
        params![network, now],
    )
    .map_err(db_err)?;
    db.execute(
        "DELETE FROM networks WHERE tag NOT IN
             (SELECT tag FROM networks ORDER BY seen DESC, tag LIMIT ?1)",
        params![keep],
    )
    .map_err(db_err)?;
    for table in ["network_doors", "network_budgets", "network_probes"] {
        db.execute(
            &format!(
                "DELETE FROM {table} WHERE network <> '' \
                 AND network NOT IN (SELECT tag FROM networks)"
            ),
            [],
        )
        .map_err(db_err)?;
    }
    Ok(())
}

/// What waits to be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Queued {
    /// Messages not yet acknowledged by the server.
    pub messages: u64,
    /// Requests in the outbox (messages, commits, drops, ...).
    pub requests: u64,
}

/// What waits to be sent.
pub(crate) fn queued(db: &Connection) -> Result<Queued, ClientError> {
    let messages: i64 = db
        .query_row("SELECT count(*) FROM messages WHERE state = 'queued'", [], |r| r.get(0))
        .map_err(db_err)?;
    let requests: i64 =
        db.query_row("SELECT count(*) FROM outbox", [], |r| r.get(0)).map_err(db_err)?;
    Ok(Queued {
        messages: u64::try_from(messages).unwrap_or(0),
        requests: u64::try_from(requests).unwrap_or(0),
    })
}

/// The packet budget learned for a door (named by the driver) on `network`, if a freeze
/// was seen there.
pub(crate) fn budget(
    db: &Connection,
    network: &str,
    door: &str,
) -> Result<Option<u32>, ClientError> {
    db.query_row(
        "SELECT packets FROM network_budgets WHERE network = ?1 AND door = ?2",
        params![network, door],
        |r| r.get(0),
    )
    .optional()
    .map_err(db_err)
}

/// Records a door's packet budget on `network`.
pub(crate) fn set_budget(
    db: &Connection,
    network: &str,
    door: &str,
    packets: u32,
) -> Result<(), ClientError> {
    db.execute(
        "INSERT INTO network_budgets (network, door, packets) VALUES (?1, ?2, ?3)
         ON CONFLICT (network, door) DO UPDATE SET packets = excluded.packets",
        params![network, door, packets],
    )
    .map_err(db_err)?;
    Ok(())
}

/// What a probe of a door for a freeze found on a network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// When (Unix seconds).
    pub at: u64,
    /// Whether the probe's connection froze.
    pub froze: bool,
}

/// The last probe of `door` on `network`, if any.
pub(crate) fn probe(
    db: &Connection,
    network: &str,
    door: &str,
) -> Result<Option<Probe>, ClientError> {
    db.query_row(
        "SELECT at, froze FROM network_probes WHERE network = ?1 AND door = ?2",
        params![network, door],
        |r| Ok(Probe { at: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0), froze: r.get(1)? }),
    )
    .optional()
    .map_err(db_err)
}

/// Records a probe of `door` on `network`.
pub(crate) fn set_probe(
    db: &Connection,
    network: &str,
    door: &str,
    probe: Probe,
) -> Result<(), ClientError> {
    let at = i64::try_from(probe.at).unwrap_or(i64::MAX);
    db.execute(
        "INSERT INTO network_probes (network, door, at, froze) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (network, door) DO UPDATE SET at = excluded.at, froze = excluded.froze",
        params![network, door, at, probe.froze],
    )
    .map_err(db_err)?;
    Ok(())
}

/// The times (Unix seconds) a door opened connections since `since`.
pub(crate) fn opens(db: &Connection, door: &str, since: u64) -> Result<Vec<u64>, ClientError> {
    let since = i64::try_from(since).unwrap_or(i64::MAX);
    let mut stmt = db
        .prepare_cached("SELECT at FROM door_opens WHERE door = ?1 AND at >= ?2 ORDER BY at")
        .map_err(db_err)?;
    let rows = stmt.query_map(params![door, since], |r| r.get::<_, i64>(0)).map_err(db_err)?;
    rows.map(|r| r.map(|at| u64::try_from(at).unwrap_or(0)).map_err(db_err)).collect()
}

/// Records that a door opened a connection at `at` (Unix seconds), forgetting opens
/// older than `forget_before`.
pub(crate) fn opened_at(
    db: &Connection,
    door: &str,
    at: u64,
    forget_before: u64,
) -> Result<(), ClientError> {
    let at = i64::try_from(at).unwrap_or(i64::MAX);
    let forget = i64::try_from(forget_before).unwrap_or(i64::MAX);
    db.execute("DELETE FROM door_opens WHERE at < ?1", params![forget]).map_err(db_err)?;
    db.execute("INSERT INTO door_opens (door, at) VALUES (?1, ?2)", params![door, at])
        .map_err(db_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use postern_proto::gate::AccessSecret;
    use postern_proto::relay::Credential;

    use super::*;

    fn relay(port: u16) -> RelayLink {
        RelayLink {
            addrs: vec![format!("relay.example:{port}")],
            server_name: None,
            pins: vec![[1; 32]],
            credential: Credential { path: vec![[2; 8]], secret: AccessSecret([3; 32]) },
        }
    }

    fn store() -> Connection {
        let db = Connection::open_in_memory().unwrap();
        db.execute_batch(MIGRATION_RELAYS).unwrap();
        db.execute_batch(MIGRATION_NETWORKS).unwrap();
        db
    }

    #[test]
    fn relays_and_the_last_door_are_remembered_until_the_relay_goes() {
        let db = store();
        let (a, new) = add(&db, &relay(1)).unwrap();
        assert!(new);
        assert_eq!(add(&db, &relay(1)).unwrap(), (a, false));
        let (b, _) = add(&db, &relay(2)).unwrap();
        assert_eq!(list(&db).unwrap().iter().map(|r| r.id).collect::<Vec<_>>(), [a, b]);

        assert_eq!(last(&db, "n", "s").unwrap(), None);
        opened(&db, "n", "s", None).unwrap();
        assert_eq!(last(&db, "n", "s").unwrap(), Some(None));
        opened(&db, "n", "s", Some(b)).unwrap();
        assert_eq!(last(&db, "n", "s").unwrap(), Some(Some(b)));
        assert_eq!(last(&db, "n", "other").unwrap(), None);
        assert!(remove(&db, b).unwrap());
        assert!(!remove(&db, b).unwrap());
        assert_eq!(last(&db, "n", "s").unwrap(), None, "a removed relay is no door");

        assert_eq!(budget(&db, "n", "relay 1").unwrap(), None);
        set_budget(&db, "n", "relay 1", 20).unwrap();
        set_budget(&db, "n", "relay 1", 18).unwrap();
        assert_eq!(budget(&db, "n", "relay 1").unwrap(), Some(18));

        opened_at(&db, "relay 1", 100, 0).unwrap();
        opened_at(&db, "relay 1", 150, 0).unwrap();
        opened_at(&db, "direct x", 150, 0).unwrap();
        assert_eq!(opens(&db, "relay 1", 120).unwrap(), [150]);
        opened_at(&db, "relay 1", 200, 140).unwrap();
        assert_eq!(opens(&db, "relay 1", 0).unwrap(), [150, 200], "older ones forgotten");
    }

    #[test]
    fn each_network_has_its_own_doors_and_budgets_and_old_networks_are_forgotten() {
        let db = store();
        let (a, _) = add(&db, &relay(1)).unwrap();
        opened(&db, "mobile", "s", Some(a)).unwrap();
        set_budget(&db, "mobile", "direct x", 20).unwrap();
        seen_network(&db, "mobile", 10).unwrap();
        seen_network(&db, "home", 11).unwrap();
        assert_eq!(last(&db, "home", "s").unwrap(), None);
        assert_eq!(budget(&db, "home", "direct x").unwrap(), None);
        opened(&db, "home", "s", None).unwrap();
        assert_eq!(last(&db, "home", "s").unwrap(), Some(None));
        let probed = Probe { at: 5, froze: true };
        set_probe(&db, "mobile", "relay 1", probed).unwrap();
        assert_eq!(probe(&db, "mobile", "relay 1").unwrap(), Some(probed));
        assert_eq!(probe(&db, "home", "relay 1").unwrap(), None);
        set_probe(&db, "mobile", "relay 1", Probe { at: 6, froze: false }).unwrap();
        assert_eq!(probe(&db, "mobile", "relay 1").unwrap(), Some(Probe { at: 6, froze: false }));
        assert_eq!(last(&db, "mobile", "s").unwrap(), Some(Some(a)));
        assert_eq!(budget(&db, "mobile", "direct x").unwrap(), Some(20));

        // Once MAX_NETWORKS others were seen since, `mobile` is forgotten; the unknown
        // network never is.
        set_budget(&db, "", "direct x", 22).unwrap();
        for i in 0..MAX_NETWORKS {
            seen_network(&db, &format!("n{i}"), 20 + u64::try_from(i).unwrap()).unwrap();
        }
        assert_eq!(last(&db, "mobile", "s").unwrap(), None);
        assert_eq!(budget(&db, "mobile", "direct x").unwrap(), None);
        assert_eq!(probe(&db, "mobile", "relay 1").unwrap(), None);
        assert_eq!(budget(&db, "", "direct x").unwrap(), Some(22));
        let kept: i64 = db.query_row("SELECT count(*) FROM networks", [], |r| r.get(0)).unwrap();
        assert_eq!(usize::try_from(kept).unwrap(), MAX_NETWORKS);
    }

    #[test]
    fn what_was_learned_before_networks_goes_under_the_unknown_one() {
        let db = Connection::open_in_memory().unwrap();
        db.execute_batch(MIGRATION_RELAYS).unwrap();
        db.execute("INSERT INTO last_doors (server, relay) VALUES ('s', NULL)", []).unwrap();
        db.execute("INSERT INTO door_budgets (door, packets) VALUES ('network', 21)", []).unwrap();
        db.execute_batch(MIGRATION_NETWORKS).unwrap();
        assert_eq!(last(&db, "", "s").unwrap(), Some(None));
        assert_eq!(budget(&db, "", "network").unwrap(), Some(21));
        assert_eq!(budget(&db, "home", "network").unwrap(), None);
    }
}
