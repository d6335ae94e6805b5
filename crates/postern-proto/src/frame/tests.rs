use proptest::prelude::*;

use super::*;
use crate::envelope::Envelope;

fn all_requests() -> Vec<Request> {
    let m = MailboxId([1; 32]);
    vec![
        Request::Ping,
        Request::MailboxCreate { mailbox: m, owner_key: PublicKey([2; 32]) },
        Request::DropCreate { mailbox: m, drop: DropId([3; 32]) },
        Request::DropRevoke { mailbox: m, drop: DropId([3; 32]) },
        Request::Drop {
            drop: DropId([3; 32]),
            idem: IdemKey([4; 16]),
            body: Body::Inline(vec![9; 40]),
        },
        Request::MailboxFetch { mailbox: m, after: 5, max_items: 10, max_bytes: 4_000 },
        Request::MailboxReadPart { mailbox: m, seq: 6, offset: 16_384, max_bytes: 4_000 },
        Request::MailboxDelete { mailbox: m, through: 7 },
        Request::KeyPackageUpload {
            mailbox: m,
            device: DeviceId([5; 16]),
            last_resort: true,
            packages: vec![vec![1; 300], vec![2; 310]],
        },
        Request::KeyPackageStatus { mailbox: m },
        Request::ClaimTokenCreate {
            mailbox: m,
            token_hash: TokenHash([6; 32]),
            policy: ClaimPolicy::Daily(20),
            expires_day: 21_000,
        },
        Request::ClaimTokenCreate {
            mailbox: m,
            token_hash: TokenHash([6; 32]),
            policy: ClaimPolicy::Once,
            expires_day: 21_000,
        },
        Request::ClaimTokenRevoke { mailbox: m, token_hash: TokenHash([6; 32]) },
        Request::KeyPackageClaim { token: ClaimToken([7; 32]) },
        Request::LogCreate { log: LogId([8; 32]), key: PublicKey([2; 32]) },
        Request::LogAuth { log: LogId([8; 32]), key: PublicKey([3; 32]) },
        Request::LogAppend { log: LogId([8; 32]), body: Body::Upload(UploadId([9; 16])) },
        Request::LogRead { log: LogId([8; 32]), after: 0, max_items: 64, max_bytes: 4_000 },
        Request::LogReadPart { log: LogId([8; 32]), seq: 1, offset: 2, max_bytes: 4_000 },
        Request::Subscribe { log: LogId([8; 32]), after: 3, max_bytes: 4_000 },
        Request::Unsubscribe { log: LogId([8; 32]) },
        Request::UploadChunk {
            upload: UploadId([9; 16]),
            total_len: 20_000,
            offset: 16_384,
            bytes: vec![1; 3616],
        },
    ]
}

#[test]
fn every_request_round_trips() {
    for (i, request) in all_requests().into_iter().enumerate() {
        let signature = match request.signer() {
            Signer::None => None,
            _ => Some(Signature([0xab; 64])),
        };
        let frame = ClientFrame { request_id: i as u32, request, signature };
        let bytes = frame.encode();
        assert_eq!(ClientFrame::decode(&bytes).as_ref(), Ok(&frame), "{frame:?}");
        // Any truncation fails cleanly.
        for cut in 0..bytes.len() {
            assert!(ClientFrame::decode(&bytes[..cut]).is_err(), "{frame:?} cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(ClientFrame::decode(&long), Err(DecodeError::TrailingBytes));
    }
}

#[test]
fn wire_layout_is_stable() {
    // A snapshot of the byte layout: once released, changing it breaks every deployed client.
    let frame = ClientFrame {
        request_id: 0x0102_0304,
        request: Request::LogRead {
            log: LogId([0xee; 32]),
            after: 9,
            max_items: 64,
            max_bytes: 4_000,
        },
        signature: None,
    };
    let hex: String = frame.encode().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, format!("01010203040f{}000000000000000900400fa0", "ee".repeat(32)));
    let resp = ServerFrame::Response { request_id: 7, result: Ok(Response::Seq(42)) };
    let hex: String = resp.encode().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, "010000000007000200000000000000 2a".replace(' ', ""));
    let err = ServerFrame::Response { request_id: 7, result: Err(ErrorCode::NotFound) };
    assert_eq!(err.encode(), vec![1, 0, 0, 0, 0, 7, 4]);
}

#[test]
fn signatures_bind_nonce_and_content() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let mut frame = ClientFrame {
        request_id: 1,
        request: Request::MailboxCreate {
            mailbox: MailboxId([1; 32]),
            owner_key: crate::ids::public_key(&key),
        },
        signature: None,
    };
    frame.sign(&key, &[1; 32]);
    let owner = crate::ids::public_key(&key);
    let sig = frame.signature.unwrap();
    assert!(owner.verify(&frame.signing_input(&[1; 32]), &sig));
    assert!(!owner.verify(&frame.signing_input(&[2; 32]), &sig), "other connection's nonce");
    frame.request_id = 2;
    assert!(!owner.verify(&frame.signing_input(&[1; 32]), &sig), "other request id");
}

#[test]
fn refuses_unknown_version_op_and_bad_fields() {
    assert_eq!(ClientFrame::decode(&[2, 0, 0, 0, 1, 0]), Err(DecodeError::UnsupportedVersion(2)));
    assert_eq!(ClientFrame::decode(&[1, 0, 0, 0, 1, 200]), Err(DecodeError::Invalid("operation")));
    let mut policy = ClientFrame {
        request_id: 1,
        request: Request::ClaimTokenCreate {
            mailbox: MailboxId([1; 32]),
            token_hash: TokenHash([6; 32]),
            policy: ClaimPolicy::Once,
            expires_day: 1,
        },
        signature: Some(Signature([0; 64])),
    }
    .encode();
    policy[6 + 64] = 7;
    assert_eq!(ClientFrame::decode(&policy), Err(DecodeError::Invalid("claim policy")));
    // A length prefix that claims more than the limit is refused before allocating.
    let mut big = vec![1, 0, 0, 0, 1, op::LOG_APPEND];
    big.extend_from_slice(&[0; 32]);
    big.push(0);
    big.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(ClientFrame::decode(&big), Err(DecodeError::TooLong));
}

#[test]
fn server_frames_round_trip() {
    let frames = vec![
        ServerFrame::Response { request_id: 1, result: Ok(Response::Ok) },
        ServerFrame::Response { request_id: 2, result: Ok(Response::Pong) },
        ServerFrame::Response {
            request_id: 3,
            result: Ok(Response::Items {
                items: vec![
                    Item { seq: 1, total_len: 3, bytes: vec![1, 2, 3] },
                    Item { seq: 2, total_len: 40_000, bytes: vec![0; 100] },
                ],
                more: true,
            }),
        },
        ServerFrame::Response { request_id: 4, result: Ok(Response::Part(vec![5; 10])) },
        ServerFrame::Response {
            request_id: 5,
            result: Ok(Response::KeyPackages(vec![vec![1; 10], vec![2; 20]])),
        },
        ServerFrame::Response {
            request_id: 6,
            result: Ok(Response::KeyPackageStatus(vec![DeviceStatus {
                device: DeviceId([1; 16]),
                remaining: 3,
                last_resort: true,
            }])),
        },
        ServerFrame::Response { request_id: 7, result: Ok(Response::Upload { received: 99 }) },
        ServerFrame::Response { request_id: 8, result: Err(ErrorCode::QuotaExceeded) },
        ServerFrame::Push(Push::Items {
            log: LogId([3; 32]),
            items: vec![Item { seq: 9, total_len: 1, bytes: vec![1] }],
        }),
        ServerFrame::Push(Push::SubscriptionLost { log: LogId([3; 32]) }),
    ];
    for frame in frames {
        let bytes = frame.encode();
        assert_eq!(ServerFrame::decode(&bytes).as_ref(), Ok(&frame));
        for cut in 0..bytes.len() {
            assert!(ServerFrame::decode(&bytes[..cut]).is_err());
        }
    }
    for code in 1..=11 {
        let c = ErrorCode::from_code(code).unwrap();
        assert_eq!(c.code(), code);
    }
    assert_eq!(ErrorCode::from_code(0), None);
    assert_eq!(ErrorCode::from_code(12), None);
}

#[test]
fn envelope_signs_and_verifies() {
    let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
    let next = PublicKey([4; 32]);
    let log = LogId([5; 32]);
    let env = Envelope::seal(&log, &key, IdemKey([6; 16]), Some(next), vec![7; 346]);
    let decoded = Envelope::decode(&env.encode()).unwrap();
    assert_eq!(decoded, env);
    let pk = crate::ids::public_key(&key);
    assert!(decoded.verify(&log, &pk));
    assert!(!decoded.verify(&LogId([6; 32]), &pk), "bound to its log");
    let other = crate::ids::public_key(&ed25519_dalek::SigningKey::from_bytes(&[9; 32]));
    assert!(!decoded.verify(&log, &other));
    let mut tampered = env.clone();
    tampered.ciphertext[0] ^= 1;
    assert!(!tampered.verify(&log, &pk));
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

proptest! {
    #[test]
    fn appends_and_chunks_round_trip(
        id in any::<u32>(),
        log in any::<[u8; 32]>(),
        body in arb_bytes(2_000),
        total in any::<u32>(),
        offset in any::<u32>(),
    ) {
        for request in [
            Request::LogAppend { log: LogId(log), body: Body::Inline(body.clone()) },
            Request::UploadChunk { upload: UploadId([1; 16]), total_len: total, offset, bytes: body.clone() },
        ] {
            let frame = ClientFrame { request_id: id, request, signature: None };
            prop_assert_eq!(ClientFrame::decode(&frame.encode()), Ok(frame));
        }
    }

    #[test]
    fn envelopes_round_trip(key in any::<[u8; 8]>(), idem in any::<[u8; 16]>(), next in proptest::option::of(any::<[u8; 32]>()), ct in arb_bytes(3_000), sig in any::<[u8; 32]>()) {
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(&sig);
        let env = Envelope {
            key_id: crate::ids::KeyId(key),
            idem: IdemKey(idem),
            next_key: next.map(PublicKey),
            ciphertext: ct,
            signature: Signature(signature),
        };
        prop_assert_eq!(Envelope::decode(&env.encode()), Ok(env));
    }

    #[test]
    fn decoders_never_panic(bytes in arb_bytes(600)) {
        let _ = ClientFrame::decode(&bytes);
        let _ = ServerFrame::decode(&bytes);
        let _ = Envelope::decode(&bytes);
        let _ = crate::pad::unpad(&bytes);
    }
}
