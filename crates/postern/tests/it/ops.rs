//! Every operation, and its refusals, against the real server.

use std::time::Duration;

use postern_net::NetError;
use postern_proto::frame::{Body, ClaimPolicy, ClientFrame, ErrorCode, Push, Request, Response};
use postern_proto::ids::{ClaimToken, PublicKey, public_key};
use postern_proto::limits::MAX_INLINE;
use postern_test_support::{TestServer, ids};

use crate::{bin, envelope, new_log, new_mailbox};

fn refused(result: Result<Response, NetError>) -> ErrorCode {
    match result {
        Err(NetError::Refused(code)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn mailbox_drops_fetch_and_delete() {
    let server = TestServer::start(bin()).await;
    let mut owner = server.connect().await;
    let mut sender = server.connect().await;
    let key = ids::signing_key();
    let (mailbox, drop) = (ids::mailbox(), ids::drop());

    let create = Request::MailboxCreate { mailbox, owner_key: public_key(&key) };
    assert_eq!(owner.request(create.clone(), Some(&key)).await.unwrap(), Response::Ok);
    assert_eq!(refused(owner.request(create, Some(&key)).await), ErrorCode::Conflict);
    owner.request(Request::DropCreate { mailbox, drop }, Some(&key)).await.unwrap();

    let idem = ids::idem();
    let sealed = b"sealed welcome".to_vec();
    let drop_req = Request::Drop { drop, idem, body: Body::Inline(sealed.clone()) };
    let first = sender.request(drop_req.clone(), None).await.unwrap();
    assert_eq!(first, Response::Seq(1));
    assert_eq!(sender.request(drop_req, None).await.unwrap(), first, "retry returns the first seq");
    let other = Request::Drop { drop: ids::drop(), idem, body: Body::Inline(sealed.clone()) };
    assert_eq!(refused(sender.request(other, None).await), ErrorCode::NotFound);

    let fetch = Request::MailboxFetch { mailbox, after: 0, max_items: 10, max_bytes: u16::MAX };
    let Response::Items { items, more } = owner.request(fetch.clone(), Some(&key)).await.unwrap()
    else {
        panic!("items expected")
    };
    assert_eq!((items.len(), more), (1, false));
    assert_eq!(items[0].bytes, sealed);

    // A stranger's signature and an unknown mailbox get the same answer.
    let stranger = ids::signing_key();
    assert_eq!(refused(owner.request(fetch.clone(), Some(&stranger)).await), ErrorCode::NotFound);
    let unknown = Request::MailboxFetch {
        mailbox: ids::mailbox(),
        after: 0,
        max_items: 10,
        max_bytes: u16::MAX,
    };
    assert_eq!(refused(owner.request(unknown, Some(&key)).await), ErrorCode::NotFound);

    owner.request(Request::MailboxDelete { mailbox, through: 1 }, Some(&key)).await.unwrap();
    let Response::Items { items, .. } = owner.request(fetch, Some(&key)).await.unwrap() else {
        panic!("items expected")
    };
    assert!(items.is_empty());

    owner.request(Request::DropRevoke { mailbox, drop }, Some(&key)).await.unwrap();
    let late = Request::Drop { drop, idem: ids::idem(), body: Body::Inline(b"late".to_vec()) };
    assert_eq!(refused(sender.request(late, None).await), ErrorCode::NotFound);
}

#[tokio::test]
async fn signed_requests_cannot_be_replayed() {
    let server = TestServer::start(bin()).await;
    let mut a = server.connect().await;
    let mut b = server.connect().await;
    let (key, mailbox) = new_mailbox(&mut a).await;

    // Signed for connection A's nonce; sent on connection B.
    let mut frame = ClientFrame {
        request_id: 100,
        request: Request::MailboxFetch { mailbox, after: 0, max_items: 1, max_bytes: u16::MAX },
        signature: None,
    };
    frame.sign(&key, a.nonce());
    b.send_frame(&frame).await.unwrap();
    assert_eq!(refused(b.response(100).await), ErrorCode::NotFound);

    // On A it works once; the same request id again is a protocol violation that closes A.
    a.send_frame(&frame).await.unwrap();
    assert!(matches!(a.response(100).await.unwrap(), Response::Items { .. }));
    a.send_frame(&frame).await.unwrap();
    assert_eq!(refused(a.response(100).await), ErrorCode::BadFrame);
    assert!(a.request(Request::Ping, None).await.is_err(), "closed after a bad frame");
    let mut c = server.connect().await;
    assert_eq!(c.request(Request::Ping, None).await.unwrap(), Response::Pong, "others unaffected");
}

#[tokio::test]
async fn key_packages_are_claimed_by_token_one_per_device() {
    let server = TestServer::start(bin()).await;
    let mut owner = server.connect().await;
    let mut joiner = server.connect().await;
    let (key, mailbox) = new_mailbox(&mut owner).await;
    let (d1, d2) = (ids::device(), ids::device());
    for (device, last_resort, packages) in [
        (d1, false, vec![vec![1; 300], vec![2; 300]]),
        (d1, true, vec![vec![9; 300]]),
        (d2, false, vec![vec![3; 300]]),
    ] {
        let upload = Request::KeyPackageUpload { mailbox, device, last_resort, packages };
        owner.request(upload, Some(&key)).await.unwrap();
    }
    let token = ClaimToken([7; 32]);
    let create = Request::ClaimTokenCreate {
        mailbox,
        token_hash: token.hash(),
        policy: ClaimPolicy::Once,
        expires_day: u32::MAX,
    };
    owner.request(create, Some(&key)).await.unwrap();
    let claim = Request::KeyPackageClaim { token: token.clone() };
    let Response::KeyPackages(got) = joiner.request(claim.clone(), None).await.unwrap() else {
        panic!("key packages expected")
    };
    assert_eq!(got.len(), 2, "one per device");
    assert_eq!(refused(joiner.request(claim, None).await), ErrorCode::NotFound, "used up");
    let wrong = Request::KeyPackageClaim { token: ClaimToken([8; 32]) };
    assert_eq!(refused(joiner.request(wrong, None).await), ErrorCode::NotFound);
    let Response::KeyPackageStatus(status) =
        owner.request(Request::KeyPackageStatus { mailbox }, Some(&key)).await.unwrap()
    else {
        panic!("status expected")
    };
    let total: u32 = status.iter().map(|d| d.remaining).sum();
    assert_eq!(total, 1);
}

#[tokio::test]
async fn appends_need_a_registered_epoch_key_and_are_idempotent() {
    let server = TestServer::start(bin()).await;
    let mut member = server.connect().await;
    let k1 = ids::signing_key();
    let log = ids::log();
    let create = Request::LogCreate { log, key: public_key(&k1) };
    member.request(create.clone(), Some(&k1)).await.unwrap();
    // Again with the key it holds: a keep-alive, accepted. With another key: taken.
    assert_eq!(member.request(create, Some(&k1)).await.unwrap(), Response::Ok);
    let k0 = ids::signing_key();
    let other = Request::LogCreate { log, key: public_key(&k0) };
    assert_eq!(refused(member.request(other, Some(&k0)).await), ErrorCode::Conflict);

    let append = |bytes: Vec<u8>| Request::LogAppend { log, body: Body::Inline(bytes) };
    let idem = ids::idem();
    let first = envelope(&log, &k1, idem, None, b"ciphertext one");
    assert_eq!(member.request(append(first.clone()), None).await.unwrap(), Response::Seq(1));
    assert_eq!(member.request(append(first), None).await.unwrap(), Response::Seq(1), "retry");
    let changed = envelope(&log, &k1, idem, None, b"other content");
    assert_eq!(refused(member.request(append(changed), None).await), ErrorCode::Conflict);

    // A stranger's key, and a signature for another log, are refused like a missing log.
    let stranger = ids::signing_key();
    let bad = envelope(&log, &stranger, ids::idem(), None, b"junk");
    assert_eq!(refused(member.request(append(bad), None).await), ErrorCode::NotFound);
    let elsewhere = envelope(&ids::log(), &k1, ids::idem(), None, b"junk");
    assert_eq!(refused(member.request(append(elsewhere), None).await), ErrorCode::NotFound);
    let missing = Request::LogAppend {
        log: ids::log(),
        body: Body::Inline(envelope(&log, &k1, ids::idem(), None, b"x")),
    };
    assert_eq!(refused(member.request(missing, None).await), ErrorCode::NotFound);
    assert_eq!(
        refused(member.request(append(b"not an envelope".to_vec()), None).await),
        ErrorCode::BadRequest
    );

    // A commit registers the next epoch's key.
    let k2 = ids::signing_key();
    let commit = envelope(&log, &k1, ids::idem(), Some(public_key(&k2)), b"commit");
    assert_eq!(member.request(append(commit), None).await.unwrap(), Response::Seq(2));
    let next = envelope(&log, &k2, ids::idem(), None, b"epoch two");
    assert_eq!(member.request(append(next), None).await.unwrap(), Response::Seq(3));

    let Response::Items { items, more } = member
        .request(Request::LogRead { log, after: 1, max_items: 10, max_bytes: u16::MAX }, None)
        .await
        .unwrap()
    else {
        panic!("items expected")
    };
    assert_eq!(items.iter().map(|i| i.seq).collect::<Vec<_>>(), vec![2, 3]);
    assert!(!more);
    let unknown =
        Request::LogRead { log: ids::log(), after: 0, max_items: 10, max_bytes: u16::MAX };
    assert_eq!(refused(member.request(unknown, None).await), ErrorCode::NotFound);
    // Creating a log proves possession of its first key.
    let not_mine = Request::LogCreate { log: ids::log(), key: PublicKey(public_key(&k1).0) };
    assert_eq!(refused(member.request(not_mine, Some(&stranger)).await), ErrorCode::NotFound);
}

#[tokio::test]
async fn large_entries_travel_in_chunks_and_read_back_in_parts() {
    let server = TestServer::start(bin()).await;
    let mut c = server.connect().await;
    let (key, log) = new_log(&mut c).await;
    let ciphertext: Vec<u8> = (0..45_000u32).map(|i| (i % 253) as u8).collect();
    let entry = envelope(&log, &key, ids::idem(), None, &ciphertext);
    let upload = ids::upload();
    let total_len = entry.len() as u32;
    let mut offset = 0usize;
    while offset < entry.len() {
        let end = (offset + MAX_INLINE).min(entry.len());
        let chunk = Request::UploadChunk {
            upload,
            total_len,
            offset: offset as u32,
            bytes: entry[offset..end].to_vec(),
        };
        let Response::Upload { received } = c.request(chunk, None).await.unwrap() else {
            panic!("upload progress expected")
        };
        assert_eq!(received as usize, end);
        offset = end;
    }
    let seq =
        c.request(Request::LogAppend { log, body: Body::Upload(upload) }, None).await.unwrap();
    assert_eq!(seq, Response::Seq(1));
    let Response::Items { items, .. } = c
        .request(Request::LogRead { log, after: 0, max_items: 1, max_bytes: u16::MAX }, None)
        .await
        .unwrap()
    else {
        panic!("items expected")
    };
    let mut whole = items[0].bytes.clone();
    assert_eq!(items[0].total_len, total_len);
    while whole.len() < entry.len() {
        let part =
            Request::LogReadPart { log, seq: 1, offset: whole.len() as u32, max_bytes: u16::MAX };
        let Response::Part(bytes) = c.request(part, None).await.unwrap() else {
            panic!("part expected")
        };
        whole.extend(bytes);
    }
    assert_eq!(whole, entry);
    let too_big = Request::UploadChunk {
        upload: ids::upload(),
        total_len: 2 << 20,
        offset: 0,
        bytes: vec![1],
    };
    assert_eq!(refused(c.request(too_big, None).await), ErrorCode::EntryTooLarge);
}

/// A reader behind a censor's packet budget asks for small answers: reads, parts and pushes
/// carry at most `max_bytes` entry bytes (within the server's floor), and the entry still
/// comes out whole.
#[tokio::test]
async fn reads_parts_and_pushes_keep_to_the_bytes_asked_for() {
    let server = TestServer::start(bin()).await;
    let mut writer = server.connect().await;
    let mut reader = server.connect().await;
    let (key, log) = new_log(&mut writer).await;
    reader.request(Request::Subscribe { log, after: 0, max_bytes: 1_000 }, None).await.unwrap();
    let entries: Vec<Vec<u8>> = (0..3u8)
        .map(|i| envelope(&log, &key, ids::idem(), None, &vec![i; 2_500 + usize::from(i) * 700]))
        .collect();
    for entry in &entries {
        writer
            .request(Request::LogAppend { log, body: Body::Inline(entry.clone()) }, None)
            .await
            .unwrap();
    }
    let overhead = postern_store::ITEM_OVERHEAD;
    for (i, entry) in entries.iter().enumerate() {
        let Push::Items { items, .. } = reader.next_push(Duration::from_secs(10)).await.unwrap()
        else {
            panic!("items expected")
        };
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].seq, i as u64 + 1);
        assert_eq!(items[0].bytes, entry[..1_000 - overhead], "a push keeps to 1,000 bytes");
    }
    // One read asked for 4,000 bytes brings the first entry's start and nothing more.
    let read = Request::LogRead { log, after: 0, max_items: 64, max_bytes: 4_000 };
    let Response::Items { items, more } = reader.request(read, None).await.unwrap() else {
        panic!("items expected")
    };
    assert_eq!(items.len(), 1);
    assert!(more);
    assert_eq!(items[0].bytes, entries[0][..entries[0].len().min(4_000 - overhead)]);
    // The last entry in parts of 1,500 bytes; asking below the floor gets the floor.
    let last = &entries[2];
    for (ask, got) in [(1_500u16, 1_500usize), (10, postern_proto::limits::MIN_READ_BYTES)] {
        let mut whole = Vec::new();
        let mut parts = 0;
        while whole.len() < last.len() {
            let part =
                Request::LogReadPart { log, seq: 3, offset: whole.len() as u32, max_bytes: ask };
            let Response::Part(bytes) = reader.request(part, None).await.unwrap() else {
                panic!("part expected")
            };
            assert!(bytes.len() <= got && !bytes.is_empty());
            whole.extend(bytes);
            parts += 1;
        }
        assert_eq!(&whole, last);
        assert_eq!(parts, last.len().div_ceil(got));
    }
}

#[tokio::test]
async fn subscribers_get_backlog_then_live_entries() {
    let server = TestServer::start(bin()).await;
    let mut writer = server.connect().await;
    let mut reader = server.connect().await;
    let (key, log) = new_log(&mut writer).await;
    for i in 0..5u8 {
        let env = envelope(&log, &key, ids::idem(), None, &[i; 40]);
        writer.request(Request::LogAppend { log, body: Body::Inline(env) }, None).await.unwrap();
    }
    reader.request(Request::Subscribe { log, after: 2, max_bytes: u16::MAX }, None).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let Push::Items { log: l, items } =
            reader.next_push(Duration::from_secs(10)).await.unwrap()
        else {
            panic!("items expected")
        };
        assert_eq!(l, log);
        seen.extend(items.iter().map(|i| i.seq));
    }
    assert_eq!(seen, vec![3, 4, 5]);
    for i in 5..25u8 {
        let env = envelope(&log, &key, ids::idem(), None, &[i; 40]);
        writer.request(Request::LogAppend { log, body: Body::Inline(env) }, None).await.unwrap();
    }
    while seen.len() < 23 {
        let Push::Items { items, .. } = reader.next_push(Duration::from_secs(10)).await.unwrap()
        else {
            panic!("items expected")
        };
        seen.extend(items.iter().map(|i| i.seq));
    }
    assert_eq!(seen, (3..=25).collect::<Vec<_>>(), "in order, none twice");
    let unknown = Request::Subscribe { log: ids::log(), after: 0, max_bytes: u16::MAX };
    assert_eq!(refused(reader.request(unknown, None).await), ErrorCode::NotFound);
}

#[tokio::test]
async fn malformed_frames_close_only_their_connection() {
    let server = TestServer::start(bin()).await;
    let mut bystander = server.connect().await;
    let cases: Vec<(Vec<u8>, ErrorCode)> = vec![
        (vec![1, 0, 0, 0, 1, 250], ErrorCode::BadFrame),
        (vec![9, 0, 0, 0, 1, 0], ErrorCode::UnsupportedVersion),
        (Vec::new(), ErrorCode::BadFrame),
    ];
    for (bytes, want) in cases {
        let mut c = server.connect().await;
        c.send_raw(&bytes).await.unwrap();
        assert_eq!(refused(c.response(0).await), want);
        assert!(c.request(Request::Ping, None).await.is_err(), "connection closed");
    }
    assert_eq!(bystander.request(Request::Ping, None).await.unwrap(), Response::Pong);
}
