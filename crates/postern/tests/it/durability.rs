//! Nothing acknowledged is lost: SIGKILL in the middle of a stream of appends, then restart;
//! and the same on a filesystem that throws away unsynced writes at the crash.

use std::collections::HashMap;

use postern_proto::envelope::Envelope;
use postern_proto::frame::{Body, Request, Response, ServerFrame};
use postern_proto::ids::{IdemKey, LogId};
use postern_test_support::faultfs::FaultFs;
use postern_test_support::{TestServer, ids};

use crate::{bin, envelope, new_log};

async fn create_log(server: &TestServer) -> (ed25519_dalek::SigningKey, LogId) {
    new_log(&mut server.connect().await).await
}

#[tokio::test]
async fn acknowledged_appends_survive_sigkill() {
    let mut server = TestServer::start(bin()).await;
    let (key, log) = create_log(&server).await;
    let acked = append_until_killed(&mut server, &key, log).await;
    server.restart().await;
    check_all_present(&server, log, &acked).await;
}

/// SIGKILL leaves the page cache intact, so a server that acknowledged before its fsync would
/// pass the test above. Here the data directory is on a filesystem that keeps only what was
/// fsynced, as after a power cut.
#[tokio::test]
async fn acknowledged_appends_survive_losing_unsynced_writes() {
    let mut fs = FaultFs::mount().expect("fault filesystem (needs root and /dev/fuse)");
    let mut server = TestServer::start_at(bin(), fs.path()).await;
    let (key, log) = create_log(&server).await;
    let mut acked = Vec::new();
    let mut discarded = 0;
    for round in 0..3 {
        acked.extend(append_until_killed(&mut server, &key, log).await);
        let report = fs.crash().expect("crash the fault filesystem");
        eprintln!("round {round}: {report:?}");
        assert!(report.syncs > 0, "the server never synced");
        discarded += report.bytes;
        server.restart().await;
        check_all_present(&server, log, &acked).await;
    }
    eprintln!("{} acknowledged appends kept; {discarded} unsynced bytes discarded", acked.len());
}

/// Four connections pipeline appends; the server is killed after about 150 acknowledgements.
/// Returns every acknowledged (idempotency key, sequence number).
async fn append_until_killed(
    server: &mut TestServer,
    key: &ed25519_dalek::SigningKey,
    log: LogId,
) -> Vec<(IdemKey, u64)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(IdemKey, u64)>();
    let mut writers = Vec::new();
    for _ in 0..4 {
        let mut conn = server.connect().await;
        let (key, tx) = (key.clone(), tx.clone());
        writers.push(tokio::spawn(async move {
            let mut sent = HashMap::new();
            for _ in 0..100 {
                let idem = ids::idem();
                let append = Request::LogAppend {
                    log,
                    body: Body::Inline(envelope(&log, &key, idem, None, &[7; 346])),
                };
                let Ok(id) = conn.send(append, None).await else {
                    return;
                };
                sent.insert(id, idem);
            }
            while let Ok(frame) = conn.recv().await {
                if let ServerFrame::Response { request_id, result: Ok(Response::Seq(seq)) } = frame
                {
                    let _ = tx.send((sent[&request_id], seq));
                }
            }
        }));
    }
    drop(tx);
    let mut acked = Vec::new();
    while acked.len() < 150 {
        match rx.recv().await {
            Some(ack) => acked.push(ack),
            None => break,
        }
    }
    server.kill().await;
    while let Some(ack) = rx.recv().await {
        acked.push(ack);
    }
    for w in writers {
        let _ = w.await;
    }
    assert!(acked.len() >= 150, "only {} acknowledgements before the kill", acked.len());
    acked
}

/// Every acknowledged entry is stored at its sequence number, and the log has no holes.
async fn check_all_present(server: &TestServer, log: LogId, acked: &[(IdemKey, u64)]) {
    let mut reader = server.connect().await;
    let mut stored = HashMap::new();
    let mut after = 0;
    loop {
        let read = Request::LogRead { log, after, max_items: 64, max_bytes: u16::MAX };
        let Response::Items { items, more } = reader.request(read, None).await.unwrap() else {
            panic!("items expected")
        };
        for item in &items {
            stored.insert(Envelope::decode(&item.bytes).unwrap().idem, item.seq);
        }
        match items.last() {
            Some(last) if more => after = last.seq,
            _ => break,
        }
    }
    for (idem, seq) in acked {
        assert_eq!(stored.get(idem), Some(seq), "acknowledged entry lost or moved");
    }
    let mut seqs: Vec<u64> = stored.values().copied().collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "no holes in the log");
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_keeps_data() {
    let mut server = TestServer::start(bin()).await;
    let (key, log) = create_log(&server).await;
    let mut c = server.connect().await;
    let env = envelope(&log, &key, ids::idem(), None, b"kept");
    c.request(Request::LogAppend { log, body: Body::Inline(env) }, None).await.unwrap();
    assert!(server.terminate().await, "exit status 0 after SIGTERM");
    server.restart().await;
    let mut c = server.connect().await;
    let read = Request::LogRead { log, after: 0, max_items: 8, max_bytes: u16::MAX };
    let Response::Items { items, .. } = c.request(read, None).await.unwrap() else {
        panic!("items expected")
    };
    assert_eq!(items.len(), 1);
}
