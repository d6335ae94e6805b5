//! Nothing acknowledged is lost: SIGKILL in the middle of a stream of appends, then restart.

use std::collections::HashMap;

use postern_proto::frame::{Body, Request, Response, ServerFrame};
use postern_proto::ids::{IdemKey, public_key};
use postern_test_support::{TestServer, ids};

use crate::{bin, envelope};

#[tokio::test]
async fn acknowledged_appends_survive_sigkill() {
    let mut server = TestServer::start(bin()).await;
    let key = ids::signing_key();
    let log = ids::log();
    let mut setup = server.connect().await;
    setup
        .request(
            Request::LogCreate {
                log,
                key: public_key(&key),
            },
            Some(&key),
        )
        .await
        .unwrap();

    // Four connections pipeline appends; the server is killed after ~150 acknowledgements.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(IdemKey, u64)>();
    let mut writers = Vec::new();
    for _ in 0..4 {
        let mut conn = server.connect().await;
        let (key, tx) = (key.clone(), tx.clone());
        writers.push(tokio::spawn(async move {
            let mut sent = HashMap::new();
            for _ in 0..100 {
                let idem = ids::idem();
                let env = envelope(&log, &key, idem, None, &[7; 346]);
                let Ok(id) = conn
                    .send(
                        Request::LogAppend {
                            log,
                            body: Body::Inline(env),
                        },
                        None,
                    )
                    .await
                else {
                    return;
                };
                sent.insert(id, idem);
            }
            while let Ok(frame) = conn.recv().await {
                if let ServerFrame::Response {
                    request_id,
                    result: Ok(Response::Seq(seq)),
                } = frame
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
    assert!(
        acked.len() >= 150,
        "only {} acknowledgements before the kill",
        acked.len()
    );

    server.restart().await;
    let mut reader = server.connect().await;
    let mut stored = HashMap::new();
    let mut after = 0;
    loop {
        let Response::Items { items, more } = reader
            .request(
                Request::LogRead {
                    log,
                    after,
                    max_items: 64,
                },
                None,
            )
            .await
            .unwrap()
        else {
            panic!("items expected")
        };
        for item in &items {
            let env = postern_proto::envelope::Envelope::decode(&item.bytes).unwrap();
            stored.insert(env.idem, item.seq);
        }
        match items.last() {
            Some(last) if more => after = last.seq,
            _ => break,
        }
    }
    for (idem, seq) in &acked {
        assert_eq!(
            stored.get(idem),
            Some(seq),
            "acknowledged entry lost or moved"
        );
    }
    // The sequence has no holes: every stored entry was committed whole.
    let mut seqs: Vec<u64> = stored.values().copied().collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_keeps_data() {
    let mut server = TestServer::start(bin()).await;
    let key = ids::signing_key();
    let log = ids::log();
    let mut c = server.connect().await;
    c.request(
        Request::LogCreate {
            log,
            key: public_key(&key),
        },
        Some(&key),
    )
    .await
    .unwrap();
    let env = envelope(&log, &key, ids::idem(), None, b"kept");
    c.request(
        Request::LogAppend {
            log,
            body: Body::Inline(env),
        },
        None,
    )
    .await
    .unwrap();
    assert!(server.terminate().await, "exit status 0 after SIGTERM");
    server.restart().await;
    let mut c = server.connect().await;
    let Response::Items { items, .. } = c
        .request(
            Request::LogRead {
                log,
                after: 0,
                max_items: 8,
            },
            None,
        )
        .await
        .unwrap()
    else {
        panic!("items expected")
    };
    assert_eq!(items.len(), 1);
}
