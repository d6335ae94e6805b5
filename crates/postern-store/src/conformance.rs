//! The conformance suite every [`Store`] back end passes.
//!
//! Each function takes a fresh, empty store with default [`Quotas`] and [`Retention`] unless
//! its name says otherwise. Back ends run them all with [`conformance_tests!`](crate::conformance_tests).

// A test suite: a failed expectation is a panic, as in any test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use postern_proto::frame::{ClaimPolicy, Item};
use postern_proto::ids::{
    DeviceId, DropId, IdemKey, KeyId, LogId, MailboxId, PublicKey, TokenHash, UploadId,
};

use crate::{Day, NewEntry, ReadLimit, Retention, Store, StoreError};

/// Runs every conformance test against stores made by `$make`, an async expression that
/// yields `(store, guard)`; the guard (a temporary directory, say) lives as long as the test.
/// `$small_disk` makes one whose global disk quota is about 4 MiB.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr, $small_disk:expr) => {
        $crate::conformance_tests!(@each $small_disk; disk_quota_refuses_new_data);
        $crate::conformance_tests!(@each $make;
            mailbox_create_and_conflict,
            drops_are_idempotent_and_ordered,
            revoked_drop_refuses_and_forgets,
            mailbox_delete_and_parts,
            drop_quota_refuses_without_losing,
            key_packages_claim_once_and_last_resort,
            daily_claim_token_is_rate_limited,
            log_append_is_idempotent_and_ordered,
            log_keys_register_and_expire,
            log_read_budget_and_parts,
            log_quota_refuses,
            uploads_resume_and_complete,
            retention_sweeps_by_kind,
        );
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let (store, _guard) = $make.await;
                $crate::conformance::$name(&store).await;
            }
        )*
    };
}

const TODAY: Day = 20_000;
const ALL: ReadLimit = ReadLimit { max_items: 64, max_bytes: 17_000 };

fn key(n: u8) -> PublicKey {
    PublicKey([n; 32])
}

fn entry(idem: u8, data: &[u8]) -> NewEntry {
    numbered_entry(u32::from(idem), data)
}

fn numbered_entry(n: u32, data: &[u8]) -> NewEntry {
    let mut idem = [0u8; 16];
    idem[..4].copy_from_slice(&n.to_be_bytes());
    NewEntry {
        idem: IdemKey(idem),
        key_id: key(1).key_id(),
        next_key: None,
        data: data.to_vec(),
        from_upload: None,
    }
}

fn seqs(items: &[Item]) -> Vec<u64> {
    items.iter().map(|i| i.seq).collect()
}

/// Creating a mailbox twice conflicts; an unknown mailbox is not found.
pub async fn mailbox_create_and_conflict<S: Store>(s: &S) {
    let m = MailboxId([1; 32]);
    s.create_mailbox(m, key(1), TODAY).await.unwrap();
    assert_eq!(s.create_mailbox(m, key(2), TODAY).await, Err(StoreError::Conflict));
    assert_eq!(s.owner_key(m, TODAY).await, Ok(key(1)));
    assert_eq!(s.owner_key(MailboxId([2; 32]), TODAY).await, Err(StoreError::NotFound));
    assert_eq!(s.create_drop(MailboxId([2; 32]), DropId([1; 32])).await, Err(StoreError::NotFound));
}

/// Drops get increasing sequence numbers; a retry returns the first one.
pub async fn drops_are_idempotent_and_ordered<S: Store>(s: &S) {
    let m = MailboxId([1; 32]);
    let d = DropId([2; 32]);
    s.create_mailbox(m, key(1), TODAY).await.unwrap();
    s.create_drop(m, d).await.unwrap();
    s.create_drop(m, d).await.unwrap();
    let a = s.drop_item(d, IdemKey([1; 16]), b"one".to_vec(), None, TODAY).await.unwrap();
    let b = s.drop_item(d, IdemKey([2; 16]), b"two".to_vec(), None, TODAY).await.unwrap();
    assert!(a.new && b.new && b.seq > a.seq);
    let again = s.drop_item(d, IdemKey([1; 16]), b"one".to_vec(), None, TODAY).await.unwrap();
    assert_eq!((again.seq, again.new), (a.seq, false));
    assert_eq!(
        s.drop_item(d, IdemKey([1; 16]), b"other".to_vec(), None, TODAY).await,
        Err(StoreError::Conflict)
    );
    assert_eq!(
        s.drop_item(DropId([9; 32]), IdemKey([1; 16]), b"x".to_vec(), None, TODAY).await,
        Err(StoreError::NotFound)
    );
    let page = s.fetch_mailbox(m, 0, ALL).await.unwrap();
    assert_eq!(seqs(&page.items), vec![a.seq, b.seq]);
    assert_eq!(page.items[1].bytes, b"two");
    assert!(!page.more);
    let page = s.fetch_mailbox(m, a.seq, ALL).await.unwrap();
    assert_eq!(seqs(&page.items), vec![b.seq]);
    let page = s.fetch_mailbox(m, 0, ReadLimit { max_items: 1, max_bytes: 17_000 }).await.unwrap();
    assert_eq!((seqs(&page.items), page.more), (vec![a.seq], true));
}

/// A revoked drop address takes nothing more and its unread items are gone.
pub async fn revoked_drop_refuses_and_forgets<S: Store>(s: &S) {
    let m = MailboxId([1; 32]);
    let (d1, d2) = (DropId([2; 32]), DropId([3; 32]));
    s.create_mailbox(m, key(1), TODAY).await.unwrap();
    s.create_drop(m, d1).await.unwrap();
    s.create_drop(m, d2).await.unwrap();
    s.drop_item(d1, IdemKey([1; 16]), b"a".to_vec(), None, TODAY).await.unwrap();
    let kept = s.drop_item(d2, IdemKey([1; 16]), b"b".to_vec(), None, TODAY).await.unwrap();
    assert_eq!(s.revoke_drop(MailboxId([7; 32]), d1).await, Err(StoreError::NotFound));
    s.revoke_drop(m, d1).await.unwrap();
    assert_eq!(
        s.drop_item(d1, IdemKey([2; 16]), b"c".to_vec(), None, TODAY).await,
        Err(StoreError::NotFound)
    );
    let page = s.fetch_mailbox(m, 0, ALL).await.unwrap();
    assert_eq!(seqs(&page.items), vec![kept.seq]);
}

/// Deleting through a sequence number removes exactly those items; parts read large items.
pub async fn mailbox_delete_and_parts<S: Store>(s: &S) {
    let m = MailboxId([1; 32]);
    let d = DropId([2; 32]);
    s.create_mailbox(m, key(1), TODAY).await.unwrap();
    s.create_drop(m, d).await.unwrap();
    let big: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
    let first = s.drop_item(d, IdemKey([1; 16]), big.clone(), None, TODAY).await.unwrap();
    let second = s.drop_item(d, IdemKey([2; 16]), b"x".to_vec(), None, TODAY).await.unwrap();
    let page = s.fetch_mailbox(m, 0, ALL).await.unwrap();
    assert_eq!(page.items[0].total_len, 40_000);
    let got = page.items[0].bytes.len();
    assert!(got > 0 && got <= 16_384);
    assert_eq!(page.items[0].bytes, big[..got]);
    let part = s.read_mailbox_part(m, first.seq, got as u32, 16_384).await.unwrap();
    assert_eq!(part, big[got..got + part.len()]);
    assert_eq!(s.read_mailbox_part(m, first.seq, 40_001, 10).await, Err(StoreError::BadRequest));
    assert_eq!(s.read_mailbox_part(m, 99, 0, 10).await, Err(StoreError::NotFound));
    s.delete_mailbox_items(m, first.seq).await.unwrap();
    let page = s.fetch_mailbox(m, 0, ALL).await.unwrap();
    assert_eq!(seqs(&page.items), vec![second.seq]);
}

/// A full drop address refuses new items and keeps the old ones.
pub async fn drop_quota_refuses_without_losing<S: Store>(s: &S) {
    let m = MailboxId([1; 32]);
    let d = DropId([2; 32]);
    s.create_mailbox(m, key(1), TODAY).await.unwrap();
    s.create_drop(m, d).await.unwrap();
    let chunk = vec![7u8; 1 << 20];
    let mut stored = 0;
    let mut refused = false;
    for i in 0..40u8 {
        match s.drop_item(d, IdemKey([i; 16]), chunk.clone(), None, TODAY).await {
            Ok(_) => stored += 1,
            Err(StoreError::QuotaExceeded) => {
                refused = true;
                break;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(refused, "the default 16 MiB drop quota was never reached");
    let mut count = 0;
    let mut after = 0;
    loop {
        let page = s.fetch_mailbox(m, after, ALL).await.unwrap();
        count += page.items.len();
        match page.items.last() {
            Some(last) if page.more => after = last.seq,
            _ => break,
        }
    }
    assert_eq!(count, stored);
    // Deleting frees the quota.
    s.delete_mailbox_items(m, u64::MAX).await.unwrap();
    s.drop_item(d, IdemKey([200; 16]), chunk, None, TODAY).await.unwrap();
}

/// One-time tokens claim one package per device, once; the last resort is never removed.
pub async fn key_packages_claim_once_and_last_resort<S: Store>(s: &S) {
    let m = MailboxId([1; 32]);
    let (dev1, dev2) = (DeviceId([1; 16]), DeviceId([2; 16]));
    s.create_mailbox(m, key(1), TODAY).await.unwrap();
    s.upload_key_packages(m, dev1, false, vec![b"d1-a".to_vec(), b"d1-b".to_vec()], TODAY)
        .await
        .unwrap();
    s.upload_key_packages(m, dev1, true, vec![b"d1-last".to_vec()], TODAY).await.unwrap();
    s.upload_key_packages(m, dev2, true, vec![b"d2-last".to_vec()], TODAY).await.unwrap();
    // An upload sent again (a retry after a lost answer) stores nothing twice.
    s.upload_key_packages(m, dev1, false, vec![b"d1-b".to_vec()], TODAY).await.unwrap();
    let status = s.key_package_status(m).await.unwrap();
    assert_eq!(status.len(), 2);
    assert_eq!((status[0].remaining, status[0].last_resort), (2, true));
    assert_eq!((status[1].remaining, status[1].last_resort), (0, true));

    let t = TokenHash([5; 32]);
    s.create_claim_token(m, t, ClaimPolicy::Once, TODAY + 7).await.unwrap();
    let mut got = s.claim_key_packages(t, TODAY).await.unwrap();
    got.sort();
    assert_eq!(got.len(), 2, "one per device");
    assert!(got[0].starts_with(b"d1-") && got[0] != b"d1-last");
    assert_eq!(got[1], b"d2-last");
    assert_eq!(s.claim_key_packages(t, TODAY).await, Err(StoreError::NotFound), "used up");

    let t2 = TokenHash([6; 32]);
    s.create_claim_token(m, t2, ClaimPolicy::Once, TODAY - 1).await.unwrap();
    assert_eq!(s.claim_key_packages(t2, TODAY).await, Err(StoreError::NotFound), "expired");
    let t3 = TokenHash([7; 32]);
    s.create_claim_token(m, t3, ClaimPolicy::Once, TODAY + 1).await.unwrap();
    s.revoke_claim_token(m, t3).await.unwrap();
    assert_eq!(s.claim_key_packages(t3, TODAY).await, Err(StoreError::NotFound), "revoked");
    assert_eq!(
        s.create_claim_token(MailboxId([9; 32]), t3, ClaimPolicy::Once, TODAY).await,
        Err(StoreError::NotFound)
    );
    let status = s.key_package_status(m).await.unwrap();
    assert_eq!((status[0].remaining, status[0].last_resort), (1, true));
    assert_eq!((status[1].remaining, status[1].last_resort), (0, true));
}

/// A daily token allows its number of claims per day, then rate-limits until the next day.
pub async fn daily_claim_token_is_rate_limited<S: Store>(s: &S) {
    let m = MailboxId([1; 32]);
    s.create_mailbox(m, key(1), TODAY).await.unwrap();
    s.upload_key_packages(m, DeviceId([1; 16]), true, vec![b"last".to_vec()], TODAY).await.unwrap();
    let t = TokenHash([5; 32]);
    s.create_claim_token(m, t, ClaimPolicy::Daily(2), TODAY + 30).await.unwrap();
    s.claim_key_packages(t, TODAY).await.unwrap();
    s.claim_key_packages(t, TODAY).await.unwrap();
    assert_eq!(s.claim_key_packages(t, TODAY).await, Err(StoreError::RateLimited));
    s.claim_key_packages(t, TODAY + 1).await.unwrap();
}

/// Appends get 1, 2, 3…; a retry returns the first sequence number; other content conflicts.
pub async fn log_append_is_idempotent_and_ordered<S: Store>(s: &S) {
    let l = LogId([1; 32]);
    assert_eq!(s.append(l, entry(1, b"x"), TODAY).await, Err(StoreError::NotFound));
    s.create_log(l, key(1), TODAY).await.unwrap();
    assert_eq!(s.create_log(l, key(2), TODAY).await, Err(StoreError::Conflict));
    for i in 1..=5u8 {
        let a = s.append(l, entry(i, &[i]), TODAY).await.unwrap();
        assert_eq!((a.seq, a.new), (u64::from(i), true));
    }
    let again = s.append(l, entry(3, &[3]), TODAY).await.unwrap();
    assert_eq!((again.seq, again.new), (3, false));
    assert_eq!(s.append(l, entry(3, &[9]), TODAY).await, Err(StoreError::Conflict));
    let page = s.read_log(l, 2, ALL).await.unwrap();
    assert_eq!(seqs(&page.items), vec![3, 4, 5]);
    assert_eq!(page.items[0].bytes, vec![3]);
    assert_eq!(s.read_log(LogId([2; 32]), 0, ALL).await, Err(StoreError::NotFound));
}

/// The first key is registered at creation; commits register the next; keys expire unused.
pub async fn log_keys_register_and_expire<S: Store>(s: &S) {
    let l = LogId([1; 32]);
    s.create_log(l, key(1), TODAY).await.unwrap();
    assert_eq!(s.log_key(l, key(1).key_id()).await, Ok(key(1)));
    assert_eq!(s.log_key(l, key(2).key_id()).await, Err(StoreError::NotFound));
    assert_eq!(s.log_key(LogId([2; 32]), key(1).key_id()).await, Err(StoreError::NotFound));
    let mut commit = entry(1, b"commit");
    commit.next_key = Some(key(2));
    s.append(l, commit, TODAY).await.unwrap();
    assert_eq!(s.log_key(l, key(2).key_id()).await, Ok(key(2)));
    assert_eq!(s.log_key(l, KeyId([0; 8])).await, Err(StoreError::NotFound));
    // Key 1 was used today; key 2 never signed anything. Both live for the commit retention.
    let r = Retention::default();
    s.sweep(TODAY + r.commit_days).await.unwrap();
    assert_eq!(s.log_key(l, key(2).key_id()).await, Ok(key(2)));
    // Creating the log again with a key it holds keeps that key alive, as a use would.
    s.create_log(l, key(2), TODAY + 10).await.unwrap();
    s.sweep(TODAY + r.commit_days + 1).await.unwrap();
    assert_eq!(s.log_key(l, key(1).key_id()).await, Err(StoreError::NotFound));
    assert_eq!(s.log_key(l, key(2).key_id()).await, Ok(key(2)));
    assert_eq!(s.create_log(l, key(1), TODAY + 10).await, Err(StoreError::Conflict));
}

/// Reads respect the byte budget and truncate large entries; parts return the rest.
pub async fn log_read_budget_and_parts<S: Store>(s: &S) {
    let l = LogId([1; 32]);
    s.create_log(l, key(1), TODAY).await.unwrap();
    let big: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    s.append(l, entry(1, &big), TODAY).await.unwrap();
    for i in 2..=10u8 {
        s.append(l, entry(i, &[i; 3_000]), TODAY).await.unwrap();
    }
    let page = s.read_log(l, 0, ReadLimit { max_items: 64, max_bytes: 17_000 }).await.unwrap();
    let used: usize = page.items.iter().map(|i| i.bytes.len() + crate::ITEM_OVERHEAD).sum();
    assert!(used <= 17_000, "budget kept: {used}");
    assert!(page.more);
    assert_eq!(page.items[0].total_len, 50_000);
    let mut whole = page.items[0].bytes.clone();
    while whole.len() < big.len() {
        let part = s.read_log_part(l, 1, whole.len() as u32, 16_384).await.unwrap();
        assert!(!part.is_empty() && part.len() <= 16_384);
        whole.extend(part);
    }
    assert_eq!(whole, big);
    let mut all = Vec::new();
    let mut after = 0;
    loop {
        let page =
            s.read_log(l, after, ReadLimit { max_items: 3, max_bytes: 17_000 }).await.unwrap();
        all.extend(seqs(&page.items));
        after = *all.last().unwrap();
        if !page.more {
            break;
        }
    }
    assert_eq!(all, (1..=10).collect::<Vec<_>>());
}

/// A full log refuses appends; what it holds stays readable.
pub async fn log_quota_refuses<S: Store>(s: &S) {
    let l = LogId([1; 32]);
    s.create_log(l, key(1), TODAY).await.unwrap();
    let chunk = vec![1u8; 1 << 20];
    let mut stored = 0u64;
    loop {
        match s.append(l, numbered_entry(stored as u32, &chunk), TODAY).await {
            Ok(a) if a.new => stored += 1,
            Ok(_) => panic!("idempotency key reused"),
            Err(StoreError::QuotaExceeded) => break,
            Err(e) => panic!("unexpected {e:?}"),
        }
        assert!(stored < 400, "the default 256 MiB log quota was never reached");
    }
    let page = s.read_log(l, stored - 1, ALL).await.unwrap();
    assert_eq!(seqs(&page.items), vec![stored]);
}

/// Uploads accept chunks in order and resent chunks, refuse gaps, and complete.
pub async fn uploads_resume_and_complete<S: Store>(s: &S) {
    let u = UploadId([1; 16]);
    let data: Vec<u8> = (0..40_000u32).map(|i| (i % 241) as u8).collect();
    assert_eq!(s.upload_chunk(u, 40_000, 0, data[..16_000].to_vec(), TODAY).await, Ok(16_000));
    assert_eq!(s.upload_bytes(u).await, Err(StoreError::BadRequest), "incomplete");
    assert_eq!(
        s.upload_chunk(u, 40_000, 30_000, data[30_000..].to_vec(), TODAY).await,
        Err(StoreError::BadRequest),
        "gap"
    );
    assert_eq!(
        s.upload_chunk(u, 40_001, 16_000, data[16_000..20_000].to_vec(), TODAY).await,
        Err(StoreError::BadRequest),
        "total changed"
    );
    // A resend overlapping what is held is harmless.
    assert_eq!(s.upload_chunk(u, 40_000, 0, data[..16_000].to_vec(), TODAY).await, Ok(16_000));
    assert_eq!(
        s.upload_chunk(u, 40_000, 16_000, data[16_000..32_000].to_vec(), TODAY).await,
        Ok(32_000)
    );
    assert_eq!(s.upload_chunk(u, 40_000, 32_000, data[32_000..].to_vec(), TODAY).await, Ok(40_000));
    assert_eq!(s.upload_bytes(u).await.unwrap(), data);
    assert_eq!(s.upload_bytes(UploadId([2; 16])).await, Err(StoreError::NotFound));
    // Consumed by an append in the same transaction.
    let l = LogId([1; 32]);
    s.create_log(l, key(1), TODAY).await.unwrap();
    let mut e = entry(1, &data);
    e.from_upload = Some(u);
    s.append(l, e, TODAY).await.unwrap();
    assert_eq!(s.upload_bytes(u).await, Err(StoreError::NotFound));
    // An upload whose append conflicts with an earlier entry stays for a corrected retry.
    let other: Vec<u8> = data.iter().map(|b| b ^ 1).collect();
    let v = UploadId([4; 16]);
    assert_eq!(s.upload_chunk(v, 40_000, 0, other.clone(), TODAY).await, Ok(40_000));
    let mut e = entry(1, &other);
    e.from_upload = Some(v);
    assert_eq!(s.append(l, e, TODAY).await, Err(StoreError::Conflict));
    assert_eq!(s.upload_bytes(v).await.unwrap(), other);
    assert_eq!(
        s.upload_chunk(UploadId([3; 16]), 2_000_000, 0, vec![1], TODAY).await,
        Err(StoreError::BadRequest),
        "larger than the largest entry"
    );
}

/// Application entries go after 30 days, commits after 180, drops after 30.
pub async fn retention_sweeps_by_kind<S: Store>(s: &S) {
    let r = Retention::default();
    let l = LogId([1; 32]);
    s.create_log(l, key(1), TODAY).await.unwrap();
    s.append(l, entry(1, b"message"), TODAY).await.unwrap();
    let mut commit = entry(2, b"commit");
    commit.next_key = Some(key(2));
    s.append(l, commit, TODAY).await.unwrap();
    let m = MailboxId([1; 32]);
    let d = DropId([1; 32]);
    s.create_mailbox(m, key(1), TODAY).await.unwrap();
    s.create_drop(m, d).await.unwrap();
    s.drop_item(d, IdemKey([1; 16]), b"welcome".to_vec(), None, TODAY).await.unwrap();

    let swept = s.sweep(TODAY + r.entry_days).await.unwrap();
    assert_eq!((swept.entries, swept.items), (0, 0), "nothing is due on its last day");
    let swept = s.sweep(TODAY + r.entry_days + 1).await.unwrap();
    assert_eq!((swept.entries, swept.items), (1, 1));
    let page = s.read_log(l, 0, ALL).await.unwrap();
    assert_eq!(seqs(&page.items), vec![2], "the commit stays; its seq is unchanged");
    // New appends continue the sequence after a sweep.
    let a = s.append(l, entry(3, b"later"), TODAY + 170).await.unwrap();
    assert_eq!(a.seq, 3);
    // The owner's requests keep the mailbox alive; without them it expires. (The status
    // call checks existence without counting as the owner's activity.)
    assert_eq!(s.owner_key(m, TODAY + 100).await, Ok(key(1)));
    s.sweep(TODAY + r.commit_days + 1).await.unwrap();
    let page = s.read_log(l, 0, ALL).await.unwrap();
    assert_eq!(seqs(&page.items), vec![3]);
    assert!(s.key_package_status(m).await.is_ok(), "kept alive by the owner");
    s.sweep(TODAY + 100 + r.mailbox_days + 1).await.unwrap();
    assert_eq!(s.key_package_status(m).await, Err(StoreError::NotFound));
    assert_eq!(
        s.drop_item(d, IdemKey([2; 16]), b"late".to_vec(), None, TODAY + 300).await,
        Err(StoreError::NotFound),
        "its drop addresses went with it"
    );
}

/// With the global quota reached, new data is refused and stored data stays. Runs on a store
/// whose `disk_bytes` quota is about 4 MiB.
pub async fn disk_quota_refuses_new_data<S: Store>(s: &S) {
    let l = LogId([1; 32]);
    s.create_log(l, key(1), TODAY).await.unwrap();
    let mut stored = 0u64;
    let refused = loop {
        match s.append(l, numbered_entry(stored as u32, &[3u8; 256 << 10]), TODAY).await {
            Ok(_) => stored += 1,
            Err(e) => break e,
        }
        assert!(stored < 200, "quota never reached");
    };
    assert_eq!(refused, StoreError::ServerFull);
    let usage = s.usage().await.unwrap();
    assert!(usage.used_bytes >= usage.quota_bytes);
    let mut count = 0;
    let mut after = 0;
    loop {
        let page = s.read_log(l, after, ALL).await.unwrap();
        count += page.items.len() as u64;
        match page.items.last() {
            Some(last) => after = last.seq,
            None => break,
        }
    }
    assert_eq!(count, stored, "nothing acknowledged was evicted");
    // Reads and idempotent retries still work; new mailboxes do not.
    assert_eq!(
        s.create_mailbox(MailboxId([3; 32]), key(3), TODAY).await,
        Err(StoreError::ServerFull)
    );
}
