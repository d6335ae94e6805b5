use postern_store::Quotas;

use super::*;

async fn store() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("postern.db"), Options::default()).unwrap();
    (store, dir)
}

async fn small_disk_store() -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        quotas: Quotas { disk_bytes: 4 << 20, ..Quotas::default() },
        ..Options::default()
    };
    let store = SqliteStore::open(&dir.path().join("postern.db"), options).unwrap();
    (store, dir)
}

postern_store::conformance_tests!(store(), small_disk_store());

#[tokio::test]
async fn concurrent_appends_share_commits_and_all_land() {
    let (s, _dir) = store().await;
    let log = LogId([1; 32]);
    s.create_log(log, PublicKey([1; 32]), 20_000).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut idem = [0u8; 16];
            idem[..4].copy_from_slice(&i.to_be_bytes());
            let entry = NewEntry {
                idem: IdemKey(idem),
                key_id: PublicKey([1; 32]).key_id(),
                next_key: None,
                data: i.to_be_bytes().to_vec(),
                from_upload: None,
            };
            s.append(log, entry, 20_000).await.unwrap().seq
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn reopening_keeps_data_and_refuses_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postern.db");
    let s = SqliteStore::open(&path, Options::default()).unwrap();
    s.create_log(LogId([1; 32]), PublicKey([1; 32]), 20_000).await.unwrap();
    s.close();
    let s = SqliteStore::open(&path, Options::default()).unwrap();
    assert!(
        s.read_log(LogId([1; 32]), 0, ReadLimit { max_items: 1, max_bytes: 1000 }).await.is_ok()
    );
    s.close();
    let c = Connection::open(&path).unwrap();
    c.pragma_update(None, "user_version", 99).unwrap();
    drop(c);
    assert!(matches!(SqliteStore::open(&path, Options::default()), Err(StoreError::Backend(_))));
}

#[tokio::test]
async fn a_direct_write_that_fails_after_writing_rolls_back_its_batch() {
    let (s, _dir) = store().await;
    let log = LogId([2; 32]);
    s.create_log(log, PublicKey([2; 32]), 20_000).await.unwrap();
    // Refused before writing: its own answer, and the batch commits.
    let refused: Result<(), _> = s.write_direct(|_, _| Err(StoreError::NotFound)).await;
    assert!(matches!(refused, Err(StoreError::NotFound)));
    // Fails after a write: nothing of it stays, and the caller hears of the rollback.
    let spoiled: Result<(), _> = s
        .write_direct(move |c, _| {
            c.execute("UPDATE logs SET next_seq = 99 WHERE id = ?1", [&log.0[..]])
                .map_err(backend)?;
            Err(StoreError::QuotaExceeded)
        })
        .await;
    assert!(matches!(spoiled, Err(StoreError::Backend(_))), "{spoiled:?}");
    let entry = NewEntry {
        idem: IdemKey([9; 16]),
        key_id: PublicKey([2; 32]).key_id(),
        next_key: None,
        data: b"after".to_vec(),
        from_upload: None,
    };
    assert_eq!(s.append(log, entry, 20_000).await.unwrap().seq, 1);
}
