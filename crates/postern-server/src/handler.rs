//! Request handling: one function per operation over the [`Store`], and the one place where
//! store errors become wire error codes.

use postern_proto::envelope::Envelope;
use postern_proto::frame::{Body, ClientFrame, ErrorCode, Item, Request, Response, Signer};
use postern_proto::ids::{KeyId, LogId, PreparedKey, UploadId};
use postern_proto::limits::{MAX_ENTRY, MAX_INLINE, MAX_ITEMS, MIN_READ_BYTES};
use postern_proto::pad::MAX_UNPADDED;
use postern_store::{NewEntry, ReadLimit, Store, StoreError};

use crate::App;

/// Bytes of a response frame available for items (the rest is framing).
pub(crate) const READ_BUDGET: usize = MAX_UNPADDED - 64;

/// The one mapping from store errors to wire codes.
pub(crate) fn code(e: StoreError) -> ErrorCode {
    match e {
        StoreError::NotFound => ErrorCode::NotFound,
        StoreError::Conflict => ErrorCode::Conflict,
        StoreError::QuotaExceeded => ErrorCode::QuotaExceeded,
        StoreError::ServerFull => ErrorCode::ServerFull,
        StoreError::RateLimited => ErrorCode::RateLimited,
        StoreError::BadRequest => ErrorCode::BadRequest,
        StoreError::Backend(cause) => {
            tracing::error!(%cause, "storage failed");
            ErrorCode::Internal
        }
        _ => ErrorCode::Internal,
    }
}

/// What a read (or a subscription's push) may carry: as asked, within the server's limits.
pub(crate) fn read_limit(max_items: u16, max_bytes: u16) -> ReadLimit {
    ReadLimit {
        max_items: usize::from(max_items).clamp(1, MAX_ITEMS),
        max_bytes: usize::from(max_bytes).clamp(MIN_READ_BYTES, READ_BUDGET),
    }
}

/// The bytes one part may carry: as asked, within the server's limits.
fn part_limit(max_bytes: u16) -> usize {
    usize::from(max_bytes).clamp(MIN_READ_BYTES, MAX_INLINE)
}

/// Checks the request's signature, if it needs one. A bad signature and an unknown mailbox
/// get the same answer.
async fn authorize<S: Store>(
    app: &App<S>,
    nonce: &[u8; 32],
    frame: &ClientFrame,
) -> Result<(), ErrorCode> {
    let key = match frame.request.signer() {
        Signer::None => return Ok(()),
        Signer::Key(key) => key,
        Signer::Owner(mailbox) => app.store.owner_key(mailbox, app.today()).await.map_err(code)?,
    };
    let sig = frame.signature.as_ref().ok_or(ErrorCode::BadFrame)?;
    if key.verify(&frame.signing_input(nonce), sig) { Ok(()) } else { Err(ErrorCode::NotFound) }
}

async fn body_bytes<S: Store>(
    app: &App<S>,
    body: Body,
) -> Result<(Vec<u8>, Option<UploadId>), ErrorCode> {
    match body {
        Body::Inline(bytes) => Ok((bytes, None)),
        Body::Upload(id) => {
            let bytes = app.store.upload_bytes(id).await.map_err(code)?;
            if bytes.len() > MAX_ENTRY {
                return Err(ErrorCode::EntryTooLarge);
            }
            Ok((bytes, Some(id)))
        }
    }
}

/// Handles every request except subscriptions, which the session keeps itself.
/// `trusted_key`: this connection proved holding the append key with this id for the
/// request's log (`log_auth`), so an append under it needs no signature check.
pub(crate) async fn handle<S: Store>(
    app: &App<S>,
    nonce: &[u8; 32],
    frame: ClientFrame,
    trusted_key: Option<KeyId>,
) -> Result<Response, ErrorCode> {
    authorize(app, nonce, &frame).await?;
    let store = &app.store;
    let today = app.today();
    match frame.request {
        Request::Ping => Ok(Response::Pong),
        Request::MailboxCreate { mailbox, owner_key } => {
            store.create_mailbox(mailbox, owner_key, today).await.map_err(code)?;
            Ok(Response::Ok)
        }
        Request::DropCreate { mailbox, drop } => {
            store.create_drop(mailbox, drop).await.map_err(code)?;
            Ok(Response::Ok)
        }
        Request::DropRevoke { mailbox, drop } => {
            store.revoke_drop(mailbox, drop).await.map_err(code)?;
            Ok(Response::Ok)
        }
        Request::Drop { drop, idem, body } => {
            let (data, upload) = body_bytes(app, body).await?;
            let appended = store.drop_item(drop, idem, data, upload, today).await.map_err(code)?;
            Ok(Response::Seq(appended.seq))
        }
        Request::MailboxFetch { mailbox, after, max_items, max_bytes } => {
            let limit = read_limit(max_items, max_bytes);
            let page = store.fetch_mailbox(mailbox, after, limit).await.map_err(code)?;
            Ok(Response::Items { items: page.items, more: page.more })
        }
        Request::MailboxReadPart { mailbox, seq, offset, max_bytes } => {
            let max = part_limit(max_bytes);
            let bytes = store.read_mailbox_part(mailbox, seq, offset, max).await.map_err(code)?;
            Ok(Response::Part(bytes))
        }
        Request::MailboxDelete { mailbox, through } => {
            store.delete_mailbox_items(mailbox, through).await.map_err(code)?;
            Ok(Response::Ok)
        }
        Request::KeyPackageUpload { mailbox, device, last_resort, packages } => {
            store
                .upload_key_packages(mailbox, device, last_resort, packages, today)
                .await
                .map_err(code)?;
            Ok(Response::Ok)
        }
        Request::KeyPackageStatus { mailbox } => {
            Ok(Response::KeyPackageStatus(store.key_package_status(mailbox).await.map_err(code)?))
        }
        Request::ClaimTokenCreate { mailbox, token_hash, policy, expires_day } => {
            store
                .create_claim_token(mailbox, token_hash, policy, expires_day)
                .await
                .map_err(code)?;
            Ok(Response::Ok)
        }
        Request::ClaimTokenRevoke { mailbox, token_hash } => {
            store.revoke_claim_token(mailbox, token_hash).await.map_err(code)?;
            Ok(Response::Ok)
        }
        Request::KeyPackageClaim { token } => Ok(Response::KeyPackages(
            store.claim_key_packages(token.hash(), today).await.map_err(code)?,
        )),
        Request::LogCreate { log, key } => {
            store.create_log(log, key, today).await.map_err(code)?;
            Ok(Response::Ok)
        }
        Request::LogAppend { log, body } => {
            let (data, upload) = body_bytes(app, body).await?;
            let envelope = Envelope::decode(&data).map_err(|_| ErrorCode::BadRequest)?;
            if trusted_key != Some(envelope.key_id) {
                let key = append_key(app, log, envelope.key_id).await?;
                if !envelope.verify_prepared(&log, &key) {
                    return Err(ErrorCode::NotFound);
                }
            }
            let total_len = u32::try_from(data.len()).map_err(|_| ErrorCode::EntryTooLarge)?;
            let first = data[..data.len().min(MAX_INLINE)].to_vec();
            let entry = NewEntry {
                idem: envelope.idem,
                key_id: envelope.key_id,
                next_key: envelope.next_key,
                data,
                from_upload: upload,
            };
            let appended = store.append(log, entry, today).await.map_err(code)?;
            if appended.new {
                app.metrics.appends.inc();
                app.hub.notify(log, Item { seq: appended.seq, total_len, bytes: first });
            }
            Ok(Response::Seq(appended.seq))
        }
        // The signature over this connection's nonce was checked above; the key must be one
        // the log holds.
        Request::LogAuth { log, key } => match append_key(app, log, key.key_id()).await {
            Ok(held) if held.public() == key => Ok(Response::Ok),
            _ => Err(ErrorCode::NotFound),
        },
        Request::LogRead { log, after, max_items, max_bytes } => {
            let limit = read_limit(max_items, max_bytes);
            let page = store.read_log(log, after, limit).await.map_err(code)?;
            Ok(Response::Items { items: page.items, more: page.more })
        }
        Request::LogReadPart { log, seq, offset, max_bytes } => Ok(Response::Part(
            store.read_log_part(log, seq, offset, part_limit(max_bytes)).await.map_err(code)?,
        )),
        Request::UploadChunk { upload, total_len, offset, bytes } => {
            if total_len as usize > MAX_ENTRY {
                return Err(ErrorCode::EntryTooLarge);
            }
            let received =
                store.upload_chunk(upload, total_len, offset, bytes, today).await.map_err(code)?;
            Ok(Response::Upload { received })
        }
        // The session handles subscriptions; reaching here is a bug in this crate.
        Request::Subscribe { .. } | Request::Unsubscribe { .. } => Err(ErrorCode::Internal),
        _ => Err(ErrorCode::BadFrame),
    }
}

/// The log's append key with this id: from the cache, else from the store (and cached).
async fn append_key<S: Store>(
    app: &App<S>,
    log: LogId,
    key_id: KeyId,
) -> Result<PreparedKey, ErrorCode> {
    let now = std::time::Instant::now();
    let generation = match app.keys.get(log, key_id, now) {
        Ok(key) => return Ok(key),
        Err(generation) => generation,
    };
    let key = app.store.log_key(log, key_id).await.map_err(code)?;
    let key = PreparedKey::new(&key).ok_or(ErrorCode::NotFound)?;
    app.keys.put(log, key.clone(), generation, now);
    Ok(key)
}
