//! The SQLite back end of [`postern_store::Store`], the default for a single node.
//!
//! - WAL mode with `synchronous=FULL`: a commit returns only after the WAL is fsynced.
//! - One writer thread owns the write connection. Write operations queue to it; it runs
//!   every queued operation in one transaction (each in its own savepoint, so one failing
//!   operation does not undo the others), commits once, and only then answers each caller.
//!   Many appends therefore share one fsync, and no caller hears "ok" before its data is
//!   durable.
//! - Reads queue to a fixed pool of reader threads, each owning one read connection (WAL
//!   lets them read beside the writer). A fixed pool, not tokio's blocking threads: under
//!   load those grow to hundreds, each opening its own connection.
//!
//! **Architecture Invariant:** a reply to a write is sent only after the `COMMIT` of the batch
//! that holds it has returned.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use postern_proto::frame::{ClaimPolicy, DeviceStatus, Item};
use postern_proto::ids::{
    DeviceId, DropId, IdemKey, KeyId, LogId, MailboxId, PublicKey, TokenHash, UploadId,
};
use postern_proto::limits::{MAX_ENTRY, MAX_INLINE};
use postern_store::{
    Appended, Day, ITEM_OVERHEAD, NewEntry, Page, Quotas, ReadLimit, Retention, Store, StoreError,
    Swept, Usage,
};
use rusqlite::{Connection, OptionalExtension, params};

mod schema;

pub use schema::columns;

/// How the store is set up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Per-capability and global limits.
    pub quotas: Quotas,
    /// How long each kind of data is kept.
    pub retention: Retention,
}

/// Most operations one batch (one transaction, one fsync) carries.
const MAX_BATCH: usize = 512;
/// Reader threads, each with its own connection.
const READERS: usize = 4;
/// How long the checkpointer waits after a commit before it copies the write-ahead log
/// into the database, so that one checkpoint (and its fsync) covers many commits.
const CHECKPOINT_PAUSE: Duration = Duration::from_millis(50);
/// The writer checkpoints by itself only past this many log pages (16 MiB): when the
/// checkpointer fell behind, or steady writes never let the log start over (SQLite
/// restarts the log only once a checkpoint has copied all of it).
const WRITER_CHECKPOINT_PAGES: u32 = 4000;
/// A mailbox's expiry is extended when it is within this many days of the full term.
const TOUCH_SLACK: u32 = 7;

type Reply = Box<dyn FnOnce(Result<(), StoreError>) + Send>;
type Job = Box<dyn FnOnce(&Connection, &Batch) -> Reply + Send>;
type ReadJob = Box<dyn FnOnce(&Connection) + Send>;

/// What every operation of a batch knows about the store when the batch starts, and
/// whether one of them spoiled it.
struct Batch {
    full: bool,
    /// An operation without a savepoint of its own failed after it had changed rows: the
    /// whole batch is rolled back.
    spoiled: Cell<bool>,
}

/// The SQLite store. Cheap to clone; all clones share the writer and the readers.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    reads: Mutex<Option<mpsc::Sender<ReadJob>>>,
    readers: Mutex<Vec<JoinHandle<()>>>,
    options: Options,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.inner.path).finish_non_exhaustive()
    }
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(path).map_err(backend)?;
    conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(backend)?;
    conn.pragma_update(None, "journal_mode", "WAL").map_err(backend)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(backend)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts the writer thread.
    pub fn open(path: &Path, options: Options) -> Result<Self, StoreError> {
        let conn = open_connection(path)?;
        schema::migrate(&conn)?;
        conn.pragma_update(None, "wal_autocheckpoint", WRITER_CHECKPOINT_PAGES).map_err(backend)?;
        let (committed, commits) = mpsc::sync_channel::<()>(1);
        let checkpoints = open_connection(path)?;
        let checkpointer = std::thread::Builder::new()
            .name("postern-store-checkpointer".into())
            .spawn(move || checkpointer_loop(&checkpoints, &commits))
            .map_err(|e| StoreError::Backend(format!("cannot start checkpointer thread: {e}")))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let quota = options.quotas.disk_bytes;
        let writer = std::thread::Builder::new()
            .name("postern-store-writer".into())
            .spawn(move || writer_loop(conn, rx, quota, committed))
            .map_err(|e| StoreError::Backend(format!("cannot start writer thread: {e}")))?;
        let (read_tx, read_rx) = mpsc::channel::<ReadJob>();
        let read_rx = Arc::new(Mutex::new(read_rx));
        let mut readers = Vec::new();
        for i in 0..READERS {
            let conn = open_connection(path)?;
            let rx = read_rx.clone();
            let reader = std::thread::Builder::new()
                .name(format!("postern-store-reader-{i}"))
                .spawn(move || reader_loop(&conn, &rx))
                .map_err(|e| StoreError::Backend(format!("cannot start reader thread: {e}")))?;
            readers.push(reader);
        }
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                checkpointer: Mutex::new(Some(checkpointer)),
                reads: Mutex::new(Some(read_tx)),
                readers: Mutex::new(readers),
                options,
            }),
        })
    }

    /// Finishes queued reads and writes and stops the threads. Later operations fail.
    pub fn close(&self) {
        if let Ok(mut jobs) = self.inner.jobs.lock() {
            jobs.take();
        }
        if let Ok(mut reads) = self.inner.reads.lock() {
            reads.take();
        }
        // The writer ends with its queue, and the checkpointer with the writer.
        for thread in [&self.inner.writer, &self.inner.checkpointer] {
            if let Some(handle) = thread.lock().ok().and_then(|mut t| t.take()) {
                let _ = handle.join();
            }
        }
        let readers = self.inner.readers.lock().map(|mut r| std::mem::take(&mut *r));
        for reader in readers.unwrap_or_default() {
            let _ = reader.join();
        }
    }

    fn quotas(&self) -> &Quotas {
        &self.inner.options.quotas
    }

    fn retention(&self) -> &Retention {
        &self.inner.options.retention
    }

    fn submit(&self, job: Job) -> Result<(), StoreError> {
        let jobs = self.inner.jobs.lock().map_err(|_| StoreError::Backend("writer lock".into()))?;
        let tx = jobs.as_ref().ok_or_else(|| StoreError::Backend("store closed".into()))?;
        tx.send(job).map_err(|_| StoreError::Backend("writer stopped".into()))
    }

    /// Runs `f` in the next batch, in a savepoint of its own so that a refusal undoes only
    /// its own rows; resolves after the batch's commit.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Batch) -> Result<T, StoreError> + Send + 'static,
    {
        self.queue_write(true, f).await
    }

    /// `write` without a savepoint around the operation: a savepoint copies every page the
    /// operation touches (a tenth of the writer's time on appends). Only for
    /// operations that make every refusal before their first write, so that an error after
    /// a write is the database's own; it rolls back the whole batch.
    async fn write_direct<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Batch) -> Result<T, StoreError> + Send + 'static,
    {
        self.queue_write(false, f).await
    }

    async fn queue_write<T, F>(&self, savepoint: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Batch) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move |conn, batch| {
            let result = if savepoint {
                in_savepoint(conn, |c| f(c, batch))
            } else {
                let before = conn.total_changes();
                let result = f(conn, batch);
                if result.is_err() && conn.total_changes() != before {
                    batch.spoiled.set(true);
                }
                result
            };
            Box::new(move |commit: Result<(), StoreError>| {
                let _ = tx.send(commit.and(result));
            })
        }))?;
        rx.await.map_err(|_| StoreError::Backend("writer stopped".into()))?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let reads =
                self.inner.reads.lock().map_err(|_| StoreError::Backend("reader lock".into()))?;
            let reads = reads.as_ref().ok_or_else(|| StoreError::Backend("store closed".into()))?;
            reads
                .send(Box::new(move |conn| {
                    let _ = tx.send(f(conn));
                }))
                .map_err(|_| StoreError::Backend("readers stopped".into()))?;
        }
        rx.await.map_err(|_| StoreError::Backend("reader stopped".into()))?
    }
}

fn in_savepoint<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let run = |sql: &str| conn.prepare_cached(sql).and_then(|mut s| s.execute([])).map_err(backend);
    run("SAVEPOINT op")?;
    let result = f(conn);
    if result.is_err() {
        run("ROLLBACK TO op")?;
    }
    run("RELEASE op")?;
    result
}

fn used_bytes(conn: &Connection) -> Result<u64, StoreError> {
    // Run before every batch: one cached statement, not three prepared each time.
    conn.prepare_cached(
        "SELECT page_size * max(page_count - freelist_count, 0) \
         FROM pragma_page_size, pragma_page_count, pragma_freelist_count",
    )
    .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)))
    .map(|v| u64::try_from(v).unwrap_or(0))
    .map_err(backend)
}

/// A reader thread: runs read jobs on its own connection until the queue closes.
fn reader_loop(conn: &Connection, jobs: &Mutex<mpsc::Receiver<ReadJob>>) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            Ok(job) => job(conn),
            Err(_) => return,
        }
    }
}

/// Copies committed pages from the write-ahead log into the database off the writer's
/// thread, where SQLite would otherwise do it after every 1,000 pages: the copy and the
/// database's fsync no longer hold up the next batch.
fn checkpointer_loop(conn: &Connection, commits: &mpsc::Receiver<()>) {
    while commits.recv().is_ok() {
        std::thread::sleep(CHECKPOINT_PAUSE);
        while commits.try_recv().is_ok() {}
        // PASSIVE never blocks the writer or the readers; what it cannot copy yet waits
        // for the next one.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "store checkpoint failed");
        }
    }
}

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Job>,
    quota: u64,
    committed: mpsc::SyncSender<()>,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let batch = Batch {
            full: used_bytes(&conn).map_or(true, |used| used >= quota),
            spoiled: Cell::new(false),
        };
        let commit = match conn.execute_batch("BEGIN IMMEDIATE") {
            Ok(()) => {
                let replies: Vec<Reply> = jobs.into_iter().map(|job| job(&conn, &batch)).collect();
                let commit = if batch.spoiled.get() {
                    Err(StoreError::Backend("an operation failed after it wrote".into()))
                } else {
                    conn.execute_batch("COMMIT").map_err(backend)
                };
                if let Err(e) = &commit {
                    let _ = conn.execute_batch("ROLLBACK");
                    tracing::error!(error = %e, "store batch rolled back, not acknowledged");
                }
                (replies, commit)
            }
            Err(e) => {
                tracing::error!("store could not begin a transaction");
                (Vec::new(), Err(backend(e)))
            }
        };
        if commit.1.is_ok() {
            // A full channel means a checkpoint is already due.
            let _ = committed.try_send(());
        }
        for reply in commit.0 {
            reply(commit.1.clone());
        }
    }
}

fn refuse_if_full(batch: &Batch) -> Result<(), StoreError> {
    if batch.full { Err(StoreError::ServerFull) } else { Ok(()) }
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Builds a page from rows of `(seq, total length, first bytes)`, keeping the byte budget.
/// The first item is always included (truncated to fit).
fn page_from_rows(rows: Vec<(u64, u32, Vec<u8>)>, limit: ReadLimit) -> Page {
    let mut page = Page::default();
    let mut used = 0usize;
    for (i, (seq, total_len, mut bytes)) in rows.into_iter().enumerate() {
        if i == limit.max_items {
            page.more = true;
            break;
        }
        let room = limit.max_bytes.saturating_sub(used + ITEM_OVERHEAD);
        if i == 0 {
            bytes.truncate(room.min(MAX_INLINE));
        } else if bytes.len() > room {
            page.more = true;
            break;
        }
        used += bytes.len() + ITEM_OVERHEAD;
        page.items.push(Item { seq, total_len, bytes });
    }
    page
}

fn read_rows(
    conn: &Connection,
    sql: &str,
    owner: &[u8],
    after: u64,
    limit: ReadLimit,
) -> Result<Vec<(u64, u32, Vec<u8>)>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(backend)?;
    let rows = stmt
        .query_map(
            params![owner, to_i64(after), MAX_INLINE as i64, (limit.max_items + 1) as i64],
            |r| Ok((to_u64(r.get(0)?), u32::try_from(r.get::<_, i64>(1)?).unwrap_or(0), r.get(2)?)),
        )
        .map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}

fn read_part(
    conn: &Connection,
    sql: &str,
    owner: &[u8],
    seq: u64,
    offset: u32,
    max: usize,
) -> Result<Vec<u8>, StoreError> {
    let max = max.min(MAX_INLINE);
    let row: Option<(i64, Vec<u8>)> = conn
        .query_row(sql, params![owner, to_i64(seq), i64::from(offset) + 1, max as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()
        .map_err(backend)?;
    match row {
        None => Err(StoreError::NotFound),
        Some((len, _)) if i64::from(offset) > len => Err(StoreError::BadRequest),
        Some((_, bytes)) => Ok(bytes),
    }
}

fn mailbox_exists(conn: &Connection, mailbox: &MailboxId) -> Result<bool, StoreError> {
    conn.prepare_cached("SELECT 1 FROM mailboxes WHERE id = ?1")
        .and_then(|mut s| s.exists([&mailbox.0[..]]))
        .map_err(backend)
}

/// The answer to a retry: `Some` when `(owner, idem)` already holds an item (its sequence
/// number if the content is the same, a conflict if not), `None` for a new item.
fn retry_of(
    conn: &Connection,
    sql: &str,
    owner: &[u8],
    idem: &IdemKey,
    data: &[u8],
    from_upload: Option<UploadId>,
) -> Result<Option<Result<Appended, StoreError>>, StoreError> {
    let earlier: Option<(i64, Vec<u8>)> = conn
        .prepare_cached(sql)
        .and_then(|mut s| {
            s.query_row(params![owner, &idem.0[..]], |r| Ok((r.get(0)?, r.get(1)?))).optional()
        })
        .map_err(backend)?;
    let Some((seq, stored)) = earlier else { return Ok(None) };
    if stored != data {
        // Refused before anything is written: the upload stays for a retry.
        return Ok(Some(Err(StoreError::Conflict)));
    }
    consume_upload(conn, from_upload)?;
    Ok(Some(Ok(Appended { seq: to_u64(seq), new: false })))
}

fn consume_upload(conn: &Connection, upload: Option<UploadId>) -> Result<(), StoreError> {
    if let Some(u) = upload {
        conn.execute("DELETE FROM uploads WHERE id = ?1", [&u.0[..]]).map_err(backend)?;
    }
    Ok(())
}

impl Store for SqliteStore {
    async fn create_mailbox(
        &self,
        mailbox: MailboxId,
        owner_key: PublicKey,
        today: Day,
    ) -> Result<(), StoreError> {
        let expires = today.saturating_add(self.retention().mailbox_days);
        self.write(move |c, batch| {
            refuse_if_full(batch)?;
            if mailbox_exists(c, &mailbox)? {
                return Err(StoreError::Conflict);
            }
            c.execute(
                "INSERT INTO mailboxes (id, owner_key, next_seq, expires_day) VALUES (?1, ?2, 1, ?3)",
                params![&mailbox.0[..], &owner_key.0[..], expires],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn owner_key(&self, mailbox: MailboxId, today: Day) -> Result<PublicKey, StoreError> {
        let (key, expires): (Vec<u8>, u32) = self
            .read(move |c| {
                c.query_row(
                    "SELECT owner_key, expires_day FROM mailboxes WHERE id = ?1",
                    [&mailbox.0[..]],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(backend)?
                .ok_or(StoreError::NotFound)
            })
            .await?;
        if expires < today {
            return Err(StoreError::NotFound);
        }
        let term = today.saturating_add(self.retention().mailbox_days);
        if expires < term.saturating_sub(TOUCH_SLACK) {
            // Extend the expiry without waiting: losing this write only shortens a lifetime.
            let _ = self.submit(Box::new(move |c, _| {
                let _ = c.execute(
                    "UPDATE mailboxes SET expires_day = ?2 WHERE id = ?1",
                    params![&mailbox.0[..], term],
                );
                Box::new(|_| {})
            }));
        }
        PublicKey::try_from_slice(&key)
    }

    async fn create_drop(&self, mailbox: MailboxId, drop: DropId) -> Result<(), StoreError> {
        let max = self.quotas().drops_per_mailbox;
        self.write(move |c, batch| {
            if !mailbox_exists(c, &mailbox)? {
                return Err(StoreError::NotFound);
            }
            let owner: Option<Vec<u8>> = c
                .query_row("SELECT mailbox FROM drops WHERE id = ?1", [&drop.0[..]], |r| r.get(0))
                .optional()
                .map_err(backend)?;
            match owner {
                Some(m) if m == mailbox.0 => return Ok(()),
                Some(_) => return Err(StoreError::Conflict),
                None => {}
            }
            refuse_if_full(batch)?;
            let count: u32 = c
                .query_row("SELECT count(*) FROM drops WHERE mailbox = ?1", [&mailbox.0[..]], |r| {
                    r.get(0)
                })
                .map_err(backend)?;
            if count >= max {
                return Err(StoreError::QuotaExceeded);
            }
            c.execute(
                "INSERT INTO drops (id, mailbox, bytes) VALUES (?1, ?2, 0)",
                params![&drop.0[..], &mailbox.0[..]],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn revoke_drop(&self, mailbox: MailboxId, drop: DropId) -> Result<(), StoreError> {
        self.write(move |c, _| {
            let n = c
                .execute(
                    "DELETE FROM drops WHERE id = ?1 AND mailbox = ?2",
                    params![&drop.0[..], &mailbox.0[..]],
                )
                .map_err(backend)?;
            if n == 0 {
                return Err(StoreError::NotFound);
            }
            c.execute("DELETE FROM mailbox_items WHERE drop_id = ?1", [&drop.0[..]])
                .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn drop_item(
        &self,
        drop: DropId,
        idem: IdemKey,
        data: Vec<u8>,
        from_upload: Option<UploadId>,
        today: Day,
    ) -> Result<Appended, StoreError> {
        let quota = self.quotas().drop_bytes;
        let expires = today.saturating_add(self.retention().drop_days);
        // Every refusal comes before the first write.
        self.write_direct(move |c, batch| {
            let target: Option<(Vec<u8>, i64)> = c
                .query_row("SELECT mailbox, bytes FROM drops WHERE id = ?1", [&drop.0[..]], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
                .map_err(backend)?;
            let (mailbox, bytes) = target.ok_or(StoreError::NotFound)?;
            let earlier = retry_of(
                c,
                "SELECT seq, data FROM mailbox_items WHERE drop_id = ?1 AND idem = ?2",
                &drop.0,
                &idem,
                &data,
                from_upload,
            )?;
            if let Some(result) = earlier {
                return result;
            }
            refuse_if_full(batch)?;
            if to_u64(bytes) + data.len() as u64 > quota {
                return Err(StoreError::QuotaExceeded);
            }
            let seq: i64 = c
                .query_row(
                    "UPDATE mailboxes SET next_seq = next_seq + 1 WHERE id = ?1 RETURNING next_seq - 1",
                    [&mailbox[..]],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            c.prepare_cached(
                "INSERT INTO mailbox_items (mailbox, seq, drop_id, idem, data, expires_day)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![&mailbox[..], seq, &drop.0[..], &idem.0[..], &data[..], expires])
            })
            .map_err(backend)?;
            c.execute(
                "UPDATE drops SET bytes = bytes + ?2 WHERE id = ?1",
                params![&drop.0[..], data.len() as i64],
            )
            .map_err(backend)?;
            consume_upload(c, from_upload)?;
            Ok(Appended { seq: to_u64(seq), new: true })
        })
        .await
    }

    async fn fetch_mailbox(
        &self,
        mailbox: MailboxId,
        after: u64,
        limit: ReadLimit,
    ) -> Result<Page, StoreError> {
        self.read(move |c| {
            if !mailbox_exists(c, &mailbox)? {
                return Err(StoreError::NotFound);
            }
            let rows = read_rows(
                c,
                "SELECT seq, length(data), substr(data, 1, ?3) FROM mailbox_items
                 WHERE mailbox = ?1 AND seq > ?2 ORDER BY seq LIMIT ?4",
                &mailbox.0,
                after,
                limit,
            )?;
            Ok(page_from_rows(rows, limit))
        })
        .await
    }

    async fn read_mailbox_part(
        &self,
        mailbox: MailboxId,
        seq: u64,
        offset: u32,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.read(move |c| {
            read_part(
                c,
                "SELECT length(data), substr(data, ?3, ?4) FROM mailbox_items
                 WHERE mailbox = ?1 AND seq = ?2",
                &mailbox.0,
                seq,
                offset,
                max,
            )
        })
        .await
    }

    async fn delete_mailbox_items(
        &self,
        mailbox: MailboxId,
        through: u64,
    ) -> Result<(), StoreError> {
        self.write(move |c, _| {
            if !mailbox_exists(c, &mailbox)? {
                return Err(StoreError::NotFound);
            }
            c.execute(
                "UPDATE drops SET bytes = bytes - (SELECT coalesce(sum(length(data)), 0)
                   FROM mailbox_items WHERE drop_id = drops.id AND seq <= ?2)
                 WHERE mailbox = ?1",
                params![&mailbox.0[..], to_i64(through)],
            )
            .map_err(backend)?;
            c.execute(
                "DELETE FROM mailbox_items WHERE mailbox = ?1 AND seq <= ?2",
                params![&mailbox.0[..], to_i64(through)],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn upload_key_packages(
        &self,
        mailbox: MailboxId,
        device: DeviceId,
        last_resort: bool,
        packages: Vec<Vec<u8>>,
        _today: Day,
    ) -> Result<(), StoreError> {
        let quotas = *self.quotas();
        self.write(move |c, batch| {
            if !mailbox_exists(c, &mailbox)? {
                return Err(StoreError::NotFound);
            }
            refuse_if_full(batch)?;
            if packages.is_empty() || (last_resort && packages.len() != 1) {
                return Err(StoreError::BadRequest);
            }
            let others: u32 = c
                .query_row(
                    "SELECT count(DISTINCT device) FROM key_packages WHERE mailbox = ?1 AND device != ?2",
                    params![&mailbox.0[..], &device.0[..]],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            if others >= quotas.devices_per_mailbox {
                return Err(StoreError::QuotaExceeded);
            }
            if last_resort {
                c.execute(
                    "DELETE FROM key_packages WHERE mailbox = ?1 AND device = ?2 AND last_resort = 1",
                    params![&mailbox.0[..], &device.0[..]],
                )
                .map_err(backend)?;
            } else {
                let have: u32 = c
                    .query_row(
                        "SELECT count(*) FROM key_packages WHERE mailbox = ?1 AND device = ?2 AND last_resort = 0",
                        params![&mailbox.0[..], &device.0[..]],
                        |r| r.get(0),
                    )
                    .map_err(backend)?;
                if have as usize + packages.len() > quotas.key_packages_per_device as usize {
                    return Err(StoreError::QuotaExceeded);
                }
            }
            // A package already in the pool is a retry of an earlier upload: stored once,
            // so no two claims can hand out the same package.
            for p in &packages {
                c.execute(
                    "INSERT INTO key_packages (mailbox, device, last_resort, data)
                     SELECT ?1, ?2, ?3, ?4 WHERE NOT EXISTS (
                         SELECT 1 FROM key_packages
                         WHERE mailbox = ?1 AND device = ?2 AND last_resort = ?3 AND data = ?4)",
                    params![&mailbox.0[..], &device.0[..], last_resort, &p[..]],
                )
                .map_err(backend)?;
            }
            Ok(())
        })
        .await
    }

    async fn key_package_status(
        &self,
        mailbox: MailboxId,
    ) -> Result<Vec<DeviceStatus>, StoreError> {
        self.read(move |c| {
            if !mailbox_exists(c, &mailbox)? {
                return Err(StoreError::NotFound);
            }
            let mut stmt = c
                .prepare(
                    "SELECT device, sum(last_resort = 0), max(last_resort) FROM key_packages
                     WHERE mailbox = ?1 GROUP BY device ORDER BY device",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([&mailbox.0[..]], |r| {
                    Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, u32>(1)?, r.get::<_, bool>(2)?))
                })
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (device, remaining, last_resort) = row.map_err(backend)?;
                let device = DeviceId(
                    device.try_into().map_err(|_| StoreError::Backend("device id size".into()))?,
                );
                out.push(DeviceStatus { device, remaining, last_resort });
            }
            Ok(out)
        })
        .await
    }

    async fn create_claim_token(
        &self,
        mailbox: MailboxId,
        token: TokenHash,
        policy: ClaimPolicy,
        expires_day: Day,
    ) -> Result<(), StoreError> {
        let max = self.quotas().claim_tokens_per_mailbox;
        self.write(move |c, batch| {
            if !mailbox_exists(c, &mailbox)? {
                return Err(StoreError::NotFound);
            }
            refuse_if_full(batch)?;
            let count: u32 = c
                .query_row("SELECT count(*) FROM claim_tokens WHERE mailbox = ?1", [&mailbox.0[..]], |r| {
                    r.get(0)
                })
                .map_err(backend)?;
            if count >= max {
                return Err(StoreError::QuotaExceeded);
            }
            let per_day = match policy {
                ClaimPolicy::Once => 0,
                ClaimPolicy::Daily(n) => u32::from(n),
            };
            let inserted = c
                .execute(
                    "INSERT OR IGNORE INTO claim_tokens (hash, mailbox, per_day, used_day, used_count, expires_day)
                     VALUES (?1, ?2, ?3, 0, 0, ?4)",
                    params![&token.0[..], &mailbox.0[..], per_day, expires_day],
                )
                .map_err(backend)?;
            if inserted == 0 {
                return Err(StoreError::Conflict);
            }
            Ok(())
        })
        .await
    }

    async fn revoke_claim_token(
        &self,
        mailbox: MailboxId,
        token: TokenHash,
    ) -> Result<(), StoreError> {
        self.write(move |c, _| {
            let n = c
                .execute(
                    "DELETE FROM claim_tokens WHERE hash = ?1 AND mailbox = ?2",
                    params![&token.0[..], &mailbox.0[..]],
                )
                .map_err(backend)?;
            if n == 0 { Err(StoreError::NotFound) } else { Ok(()) }
        })
        .await
    }

    async fn claim_key_packages(
        &self,
        token: TokenHash,
        today: Day,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.write(move |c, _| {
            let row: Option<(Vec<u8>, u32, u32, u32, u32)> = c
                .query_row(
                    "SELECT mailbox, per_day, used_day, used_count, expires_day FROM claim_tokens WHERE hash = ?1",
                    [&token.0[..]],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                )
                .optional()
                .map_err(backend)?;
            let (mailbox, per_day, used_day, used_count, expires) = row.ok_or(StoreError::NotFound)?;
            if expires < today {
                return Err(StoreError::NotFound);
            }
            if per_day == 0 {
                c.execute("DELETE FROM claim_tokens WHERE hash = ?1", [&token.0[..]]).map_err(backend)?;
            } else {
                let used = if used_day == today { used_count } else { 0 };
                if used >= per_day {
                    return Err(StoreError::RateLimited);
                }
                c.execute(
                    "UPDATE claim_tokens SET used_day = ?2, used_count = ?3 WHERE hash = ?1",
                    params![&token.0[..], today, used + 1],
                )
                .map_err(backend)?;
            }
            let devices: Vec<Vec<u8>> = {
                let mut stmt = c
                    .prepare("SELECT DISTINCT device FROM key_packages WHERE mailbox = ?1 ORDER BY device")
                    .map_err(backend)?;
                let rows = stmt.query_map([&mailbox[..]], |r| r.get(0)).map_err(backend)?;
                rows.collect::<Result<_, _>>().map_err(backend)?
            };
            let mut out = Vec::with_capacity(devices.len());
            for device in devices {
                let pick: Option<(i64, bool, Vec<u8>)> = c
                    .query_row(
                        "SELECT id, last_resort, data FROM key_packages WHERE mailbox = ?1 AND device = ?2
                         ORDER BY last_resort, id LIMIT 1",
                        params![&mailbox[..], &device[..]],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .optional()
                    .map_err(backend)?;
                if let Some((id, last_resort, data)) = pick {
                    if !last_resort {
                        c.execute("DELETE FROM key_packages WHERE id = ?1", [id]).map_err(backend)?;
                    }
                    out.push(data);
                }
            }
            if out.is_empty() {
                return Err(StoreError::NotFound);
            }
            Ok(out)
        })
        .await
    }

    async fn create_log(&self, log: LogId, key: PublicKey, today: Day) -> Result<(), StoreError> {
        let expires = today.saturating_add(self.retention().commit_days);
        self.write(move |c, batch| {
            refuse_if_full(batch)?;
            let inserted = c
                .execute(
                    "INSERT OR IGNORE INTO logs (id, next_seq, bytes, keys) VALUES (?1, 1, 0, 1)",
                    [&log.0[..]],
                )
                .map_err(backend)?;
            if inserted == 0 {
                let held = c
                    .execute(
                        "UPDATE log_keys SET expires_day = max(expires_day, ?4)
                         WHERE log = ?1 AND key_id = ?2 AND key = ?3",
                        params![&log.0[..], &key.key_id().0[..], &key.0[..], expires],
                    )
                    .map_err(backend)?;
                return if held > 0 { Ok(()) } else { Err(StoreError::Conflict) };
            }
            c.execute(
                "INSERT INTO log_keys (log, key_id, key, expires_day) VALUES (?1, ?2, ?3, ?4)",
                params![&log.0[..], &key.key_id().0[..], &key.0[..], expires],
            )
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn log_key(&self, log: LogId, key_id: KeyId) -> Result<PublicKey, StoreError> {
        let key: Vec<u8> = self
            .read(move |c| {
                c.prepare_cached("SELECT key FROM log_keys WHERE log = ?1 AND key_id = ?2")
                    .and_then(|mut s| {
                        s.query_row(params![&log.0[..], &key_id.0[..]], |r| r.get(0)).optional()
                    })
                    .map_err(backend)?
                    .ok_or(StoreError::NotFound)
            })
            .await?;
        PublicKey::try_from_slice(&key)
    }

    async fn append(
        &self,
        log: LogId,
        entry: NewEntry,
        today: Day,
    ) -> Result<Appended, StoreError> {
        let quotas = *self.quotas();
        let retention = *self.retention();
        // Every refusal comes before the first write.
        self.write_direct(move |c, batch| {
            let earlier = retry_of(
                c,
                "SELECT seq, data FROM entries WHERE log = ?1 AND idem = ?2",
                &log.0,
                &entry.idem,
                &entry.data,
                entry.from_upload,
            )?;
            if let Some(result) = earlier {
                return result;
            }
            let state: Option<(i64, i64, u32)> = c
                .prepare_cached("SELECT next_seq, bytes, keys FROM logs WHERE id = ?1")
                .and_then(|mut s| {
                    s.query_row([&log.0[..]], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional()
                })
                .map_err(backend)?;
            let (seq, bytes, keys) = state.ok_or(StoreError::NotFound)?;
            refuse_if_full(batch)?;
            if to_u64(bytes) + entry.data.len() as u64 > quotas.log_bytes {
                return Err(StoreError::QuotaExceeded);
            }
            let key_term = today.saturating_add(retention.commit_days);
            let mut new_keys = 0;
            if let Some(next) = entry.next_key {
                if keys >= quotas.log_keys {
                    return Err(StoreError::QuotaExceeded);
                }
                new_keys = c
                    .execute(
                        "INSERT OR IGNORE INTO log_keys (log, key_id, key, expires_day) VALUES (?1, ?2, ?3, ?4)",
                        params![&log.0[..], &next.key_id().0[..], &next.0[..], key_term],
                    )
                    .map_err(backend)?;
            }
            c.prepare_cached(
                "UPDATE log_keys SET expires_day = ?3 WHERE log = ?1 AND key_id = ?2 AND expires_day < ?4",
            )
            .and_then(|mut s| {
                s.execute(params![
                    &log.0[..],
                    &entry.key_id.0[..],
                    key_term,
                    key_term.saturating_sub(TOUCH_SLACK)
                ])
            })
            .map_err(backend)?;
            let expires = today.saturating_add(if entry.next_key.is_some() {
                retention.commit_days
            } else {
                retention.entry_days
            });
            c.prepare_cached(
                "INSERT INTO entries (log, seq, idem, data, expires_day) VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| {
                s.execute(params![&log.0[..], seq, &entry.idem.0[..], &entry.data[..], expires])
            })
            .map_err(backend)?;
            c.prepare_cached(
                "UPDATE logs SET next_seq = next_seq + 1, bytes = bytes + ?2, keys = keys + ?3 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![&log.0[..], entry.data.len() as i64, new_keys as i64]))
            .map_err(backend)?;
            consume_upload(c, entry.from_upload)?;
            Ok(Appended { seq: to_u64(seq), new: true })
        })
        .await
    }

    async fn read_log(&self, log: LogId, after: u64, limit: ReadLimit) -> Result<Page, StoreError> {
        self.read(move |c| {
            let exists = c
                .prepare_cached("SELECT 1 FROM logs WHERE id = ?1")
                .and_then(|mut s| s.exists([&log.0[..]]))
                .map_err(backend)?;
            if !exists {
                return Err(StoreError::NotFound);
            }
            let rows = read_rows(
                c,
                "SELECT seq, length(data), substr(data, 1, ?3) FROM entries
                 WHERE log = ?1 AND seq > ?2 ORDER BY seq LIMIT ?4",
                &log.0,
                after,
                limit,
            )?;
            Ok(page_from_rows(rows, limit))
        })
        .await
    }

    async fn read_log_part(
        &self,
        log: LogId,
        seq: u64,
        offset: u32,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        self.read(move |c| {
            read_part(
                c,
                "SELECT length(data), substr(data, ?3, ?4) FROM entries WHERE log = ?1 AND seq = ?2",
                &log.0,
                seq,
                offset,
                max,
            )
        })
        .await
    }

    async fn upload_chunk(
        &self,
        upload: UploadId,
        total_len: u32,
        offset: u32,
        bytes: Vec<u8>,
        today: Day,
    ) -> Result<u32, StoreError> {
        let expires = today.saturating_add(self.retention().upload_days);
        if total_len == 0 || total_len as usize > MAX_ENTRY || bytes.is_empty() {
            return Err(StoreError::BadRequest);
        }
        let end = u64::from(offset) + bytes.len() as u64;
        if end > u64::from(total_len) {
            return Err(StoreError::BadRequest);
        }
        self.write(move |c, batch| {
            let held: Option<(u32, i64)> = c
                .query_row(
                    "SELECT max(total_len), sum(length(data)) FROM uploads WHERE id = ?1 HAVING count(*) > 0",
                    [&upload.0[..]],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()
                .map_err(backend)?;
            let received = match held {
                Some((total, _)) if total != total_len => return Err(StoreError::BadRequest),
                Some((_, received)) => to_u64(received),
                None => 0,
            };
            if u64::from(offset) > received {
                return Err(StoreError::BadRequest);
            }
            if end <= received {
                return Ok(received as u32);
            }
            refuse_if_full(batch)?;
            let skip = (received - u64::from(offset)) as usize;
            c.execute(
                "INSERT INTO uploads (id, offset, data, total_len, expires_day) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![&upload.0[..], to_i64(received), &bytes[skip..], total_len, expires],
            )
            .map_err(backend)?;
            Ok(end as u32)
        })
        .await
    }

    async fn upload_bytes(&self, upload: UploadId) -> Result<Vec<u8>, StoreError> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached("SELECT total_len, data FROM uploads WHERE id = ?1 ORDER BY offset")
                .map_err(backend)?;
            let rows = stmt
                .query_map([&upload.0[..]], |r| Ok((r.get::<_, u32>(0)?, r.get::<_, Vec<u8>>(1)?)))
                .map_err(backend)?;
            let mut total = None;
            let mut out = Vec::new();
            for row in rows {
                let (t, data) = row.map_err(backend)?;
                total = Some(t);
                out.extend_from_slice(&data);
            }
            match total {
                None => Err(StoreError::NotFound),
                Some(t) if out.len() != t as usize => Err(StoreError::BadRequest),
                Some(_) => Ok(out),
            }
        })
        .await
    }

    async fn sweep(&self, today: Day) -> Result<Swept, StoreError> {
        self.write(move |c, _| schema::sweep(c, today)).await
    }

    async fn usage(&self) -> Result<Usage, StoreError> {
        let quota_bytes = self.quotas().disk_bytes;
        let used_bytes = self.read(used_bytes).await?;
        Ok(Usage { used_bytes, quota_bytes })
    }
}

trait FromSlice: Sized {
    fn try_from_slice(bytes: &[u8]) -> Result<Self, StoreError>;
}

impl FromSlice for PublicKey {
    fn try_from_slice(bytes: &[u8]) -> Result<Self, StoreError> {
        bytes
            .try_into()
            .map(PublicKey)
            .map_err(|_| StoreError::Backend("stored key has the wrong size".into()))
    }
}

#[cfg(test)]
mod tests;
