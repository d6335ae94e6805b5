//! The ordinary website the server is to everyone who has not proven the access secret.
//!
//! **Architecture Invariant:** nothing here depends on Postern state, and nothing Postern does
//! is visible here: no Postern path, header or error. A refused gate is answered by exactly
//! this code, the same way as a plain visit.
//!
//! The site answers as Debian's nginx 1.22.1 with its default configuration serves these
//! files (`try_files $uri $uri/ =404`): the same status lines, headers in nginx's order,
//! error pages, path normalisation, conditional requests and byte ranges. A censor that
//! probes the address sees a common web server, not a program of its own. The lab test
//! `lookalike` compares the two request by request; where they still differ is listed in
//! docs/circumvention.md.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Version, header};
use bytes::Bytes;

/// What the `Server` header and the error pages name.
pub(crate) const SERVER: &str = "nginx/1.22.1";
/// The files' modification time (seconds since the epoch), as a static site reports it in
/// `Last-Modified` and in its `ETag`s. The lab test gives its nginx copy the same time.
const MTIME: u64 = 1_760_433_164;
/// The 404 page as nginx gzips it, without and with the MSIE padding (`site-gzip/make.py`).
const NOT_FOUND_GZ: &[u8] = include_bytes!("site-gzip/404.html.gz");
const NOT_FOUND_MSIE_GZ: &[u8] = include_bytes!("site-gzip/404-msie.html.gz");
/// [`MTIME`] as `Last-Modified` writes it.
const LAST_MODIFIED: &str = "Tue, 14 Oct 2025 09:12:44 GMT";

pub(crate) struct File {
    path: &'static [u8],
    content_type: &'static str,
    pub(crate) body: &'static [u8],
    /// The body as nginx gzips it (`gzip on` compresses text/html), made by
    /// `site-gzip/make.py`.
    gzipped: Option<&'static [u8]>,
}

const FILES: &[File] = &[
    File {
        path: b"/index.html",
        content_type: "text/html",
        body: include_bytes!("site/index.html"),
        gzipped: Some(include_bytes!("site-gzip/index.html.gz")),
    },
    File {
        path: b"/about.html",
        content_type: "text/html",
        body: include_bytes!("site/about.html"),
        gzipped: Some(include_bytes!("site-gzip/about.html.gz")),
    },
    File {
        path: b"/style.css",
        content_type: "text/css",
        body: include_bytes!("site/style.css"),
        gzipped: None,
    },
    File {
        path: b"/robots.txt",
        content_type: "text/plain",
        body: include_bytes!("site/robots.txt"),
        gzipped: None,
    },
];

/// The site's answer to a request (its body is never read: nginx's static files ignore it).
pub(crate) fn respond(parts: &Parts) -> Response<Body> {
    let http1 = parts.version <= Version::HTTP_11;
    let reply = Reply {
        http1,
        keep_alive: keep_alive(parts),
        head: parts.method == Method::HEAD,
        msie: parts.headers.get(header::USER_AGENT).is_some_and(|ua| msie(ua.as_bytes())),
        gzip: gzip(parts),
    };
    if let Some(status) = refused(parts) {
        // nginx also closes the connection after TRACE.
        let keep_alive = reply.keep_alive && parts.method != Method::TRACE;
        return Reply { keep_alive, ..reply }.error(status);
    }
    let file = match find(parts.uri.path().as_bytes()) {
        Ok(file) => file,
        Err(status) => return reply.error(status),
    };
    if parts.method != Method::GET && parts.method != Method::HEAD {
        return reply.error(StatusCode::METHOD_NOT_ALLOWED);
    }
    reply.file(file, parts)
}

/// What nginx refuses before it looks for a file, in its order: the request line and header
/// buffers (HTTP/1), the headers it allows once and the Host, then the body's framing, then
/// TRACE.
fn refused(parts: &Parts) -> Option<StatusCode> {
    let h = &parts.headers;
    let http1 = parts.version <= Version::HTTP_11;
    if http1 {
        // nginx's request line: an upper-case method, and a target that is a path or an
        // absolute URI (not `*`, not an authority).
        let method = parts.method.as_str();
        if !method.bytes().all(method_byte)
            || (parts.uri.scheme().is_none() && !parts.uri.path().starts_with('/'))
        {
            return Some(StatusCode::BAD_REQUEST);
        }
        // The lines as the client most likely sent them: `Name: value`.
        let request_line = method.len() + 1 + parts.uri.to_string().len() + " HTTP/1.1\r\n".len();
        let fields = h.iter().map(|(name, value)| name.as_str().len() + value.len() + 4);
        let lines = std::iter::once(request_line).chain(fields).chain([2]);
        if let Some(status) = oversize(lines) {
            return Some(status);
        }
    }
    let count = |name| h.get_all(name).iter().count();
    let hosts = count(header::HOST);
    if hosts > 1 || count(header::CONTENT_LENGTH) > 1 || count(header::TRANSFER_ENCODING) > 1 {
        return Some(StatusCode::BAD_REQUEST);
    }
    if (http1 && h.get(header::HOST).is_some_and(|host| !valid_host(host.as_bytes())))
        || (parts.version == Version::HTTP_11 && hosts == 0)
    {
        return Some(StatusCode::BAD_REQUEST);
    }
    if let Some(te) = h.get(header::TRANSFER_ENCODING) {
        if !te.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Some(StatusCode::NOT_IMPLEMENTED);
        }
        if h.contains_key(header::CONTENT_LENGTH) {
            return Some(StatusCode::BAD_REQUEST);
        }
    }
    (parts.method == Method::TRACE).then_some(StatusCode::METHOD_NOT_ALLOWED)
}

/// A byte nginx takes in a method: `A`–`Z`, `_` and `-`.
pub(crate) fn method_byte(b: u8) -> bool {
    b.is_ascii_uppercase() || b == b'_' || b == b'-'
}

/// ngx_http_validate_host: no empty name, no `..`, no `/`, no space or control byte.
fn valid_host(host: &[u8]) -> bool {
    let (mut dot, mut name_len, mut literal, mut port) = (None, host.len(), false, false);
    for (i, &b) in host.iter().enumerate() {
        match b {
            b'.' => {
                if i > 0 && dot == Some(i - 1) {
                    return false;
                }
                dot = Some(i);
            }
            b':' if !literal && !port => (name_len, port) = (i, true),
            b'[' if i == 0 => literal = true,
            b']' if literal => (name_len, literal, port) = (i + 1, false, true),
            b'/' | 0..=0x20 | 0x7f => return false,
            _ => {}
        }
    }
    // A trailing dot does not count.
    if name_len > 0 && dot == Some(name_len - 1) {
        name_len -= 1;
    }
    name_len > 0
}

/// The file a request path names, or the error nginx answers instead: 400 for a path it
/// cannot resolve, 404 for one it does not have.
pub(crate) fn find(path: &[u8]) -> Result<&'static File, StatusCode> {
    let path = normalise(path).map_err(|()| StatusCode::BAD_REQUEST)?;
    let path: &[u8] = if path == b"/" { b"/index.html" } else { &path };
    FILES.iter().find(|f| f.path == path).ok_or(StatusCode::NOT_FOUND)
}

/// nginx's buffers for a request's head (Debian's defaults): it starts in 1 KiB; a line that
/// does not fit there moves to the next of four 8 KiB buffers.
const SMALL_BUFFER: usize = 1024;
pub(crate) const LARGE_BUFFER: usize = 8192;
const LARGE_BUFFERS: usize = 4;

/// Whether a request head overflows nginx's buffers, given the lengths of its lines (the
/// request line first, each with its line end, and the empty line last): 414 if the request
/// line does not fit, [`too_large`] if a header line does not.
pub(crate) fn oversize(lines: impl IntoIterator<Item = usize>) -> Option<StatusCode> {
    let (mut room, mut large) = (SMALL_BUFFER, 0);
    for (i, len) in lines.into_iter().enumerate() {
        if len <= room {
            room -= len;
            continue;
        }
        if len > LARGE_BUFFER || large == LARGE_BUFFERS {
            return Some(if i == 0 { StatusCode::URI_TOO_LONG } else { too_large() });
        }
        (room, large) = (LARGE_BUFFER - len, large + 1);
    }
    None
}

/// nginx's 494: a request whose header lines overflow its buffers, answered as 400 with a
/// page of its own.
pub(crate) fn too_large() -> StatusCode {
    // 494 is in the range `http` takes; a plain 400 would be the answer otherwise.
    StatusCode::from_u16(494).unwrap_or(StatusCode::BAD_REQUEST)
}

/// The status of the site's answer to a request built from a stranger's bytes: a method, a
/// request target and header lines (`None` where `http` refuses them, as hyper would), sent
/// over HTTP/1.1 or HTTP/2. For the fuzz target `site_request`, which drives the site's own
/// readers of paths, hosts, ranges, entity tags, dates and `Accept-Encoding`.
pub fn answer_status(
    http1: bool,
    method: &[u8],
    target: &[u8],
    headers: &[(&[u8], &[u8])],
) -> Option<u16> {
    let mut request = axum::http::Request::builder()
        .version(if http1 { Version::HTTP_11 } else { Version::HTTP_2 })
        .method(Method::from_bytes(method).ok()?)
        .uri(axum::http::Uri::try_from(target).ok()?);
    for (name, value) in headers {
        request = request.header(
            header::HeaderName::from_bytes(name).ok()?,
            HeaderValue::from_bytes(value).ok()?,
        );
    }
    let (parts, ()) = request.body(()).ok()?.into_parts();
    Some(respond(&parts).status().as_u16())
}

/// How an answer is framed for the request it answers.
#[derive(Clone, Copy)]
struct Reply {
    http1: bool,
    /// Whether an HTTP/1 connection stays open (the `Connection` header nginx writes).
    keep_alive: bool,
    /// A HEAD request: headers only.
    head: bool,
    /// nginx pads its error pages for Internet Explorer (`msie_padding`, on by default).
    msie: bool,
    /// The client takes gzip, and nginx would give it (see [`gzip`]).
    gzip: bool,
}

impl Reply {
    /// Headers every answer starts with, in nginx's order.
    fn start(&self, status: StatusCode) -> Response<Body> {
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(header::SERVER, HeaderValue::from_static(SERVER));
        if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(SystemTime::now())) {
            h.insert(header::DATE, date);
        }
        resp
    }

    /// `Connection`, after `Transfer-Encoding` when a gzipped body goes in chunks (nginx
    /// writes the two in that order; hyper chunks a body whose header says so).
    fn connection(&self, h: &mut HeaderMap, gzipped: bool) {
        if self.http1 && gzipped && !self.head {
            h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
        if self.http1 {
            let value = if self.keep_alive { "keep-alive" } else { "close" };
            h.insert(header::CONNECTION, HeaderValue::from_static(value));
        }
    }

    /// nginx's built-in error page for `status`.
    fn error(self, status: StatusCode) -> Response<Body> {
        self.error_with(status, |_| {})
    }

    fn error_with(self, status: StatusCode, more: impl FnOnce(&mut HeaderMap)) -> Response<Body> {
        let reply = Reply { keep_alive: self.keep_alive && !closes(status), ..self };
        let (wire, page) = (on_the_wire(status), error_page(status, self.msie));
        let mut resp = reply.start(wire);
        // nginx gzips the 404 page (of the error statuses, only 403 and 404).
        let gzipped = match (self.gzip, status, self.msie) {
            (true, StatusCode::NOT_FOUND, false) => Some(NOT_FOUND_GZ),
            (true, StatusCode::NOT_FOUND, true) => Some(NOT_FOUND_MSIE_GZ),
            _ => None,
        };
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        if gzipped.is_none() {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(page.len()));
        }
        reply.connection(h, gzipped.is_some());
        more(h);
        if gzipped.is_some() {
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        }
        let reason = nginx_reason(wire);
        if Some(reason) != wire.canonical_reason() {
            resp.extensions_mut().insert(hyper::ext::ReasonPhrase::from_static(reason.as_bytes()));
        }
        match gzipped {
            Some(gzipped) => *resp.body_mut() = reply.gzipped_body(gzipped),
            None if !self.head => *resp.body_mut() = Body::from(page),
            None => {}
        }
        resp
    }

    /// A file, with nginx's conditional requests and byte ranges.
    fn file(self, file: &File, parts: &Parts) -> Response<Body> {
        let len = file.body.len() as u64;
        let etag = format!("\"{MTIME:x}-{len:x}\"");
        let h = &parts.headers;
        if !precondition_holds(h, &etag) {
            return self.error(StatusCode::PRECONDITION_FAILED);
        }
        let validators = |h: &mut HeaderMap, gzipped: bool| {
            h.insert(header::LAST_MODIFIED, HeaderValue::from_static(LAST_MODIFIED));
            self.connection(h, gzipped);
            // A gzipped body is not the file's bytes: its tag is weak.
            let etag = if gzipped { format!("W/{etag}") } else { etag.clone() };
            if let Ok(etag) = HeaderValue::from_str(&etag) {
                h.insert(header::ETAG, etag);
            }
        };
        // Conditions are decided on the file, before nginx's gzip filter runs.
        if not_modified(h, &etag) {
            let mut resp = self.start(StatusCode::NOT_MODIFIED);
            validators(resp.headers_mut(), false);
            // No Content-Length, as nginx: hyper adds `content-length: 0` to HTTP/2 answers
            // whose body says it is empty, so this one does not say.
            *resp.body_mut() = Body::new(Unsized(None));
            return resp;
        }
        // Gzipped, the whole file: without a length nginx serves no ranges.
        if let Some(gzipped) = file.gzipped.filter(|_| self.gzip) {
            let mut resp = self.start(StatusCode::OK);
            let h = resp.headers_mut();
            if let Ok(content_type) = HeaderValue::from_str(file.content_type) {
                h.insert(header::CONTENT_TYPE, content_type);
            }
            validators(h, true);
            h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            *resp.body_mut() = self.gzipped_body(gzipped);
            return resp;
        }
        let ranges = match h.get(header::RANGE) {
            Some(range) if if_range_holds(h, &etag) => parse_ranges(range.as_bytes(), len),
            _ => Ranges::Whole,
        };
        // The status, the body's type and bytes, and the header that says which part it is.
        let (status, content_type, content, part): (_, String, Bytes, Option<_>) = match ranges {
            Ranges::Whole => (
                StatusCode::OK,
                file.content_type.into(),
                Bytes::from_static(file.body),
                Some((header::ACCEPT_RANGES, HeaderValue::from_static("bytes"))),
            ),
            Ranges::Unsatisfiable => {
                let range = HeaderValue::from_str(&format!("bytes */{len}"));
                return self.error_with(StatusCode::RANGE_NOT_SATISFIABLE, |h| {
                    if let Ok(range) = range {
                        h.insert(header::CONTENT_RANGE, range);
                    }
                });
            }
            Ranges::Some(ranges) if ranges.len() == 1 => {
                let (start, end) = ranges[0];
                (
                    StatusCode::PARTIAL_CONTENT,
                    file.content_type.into(),
                    Bytes::from_static(&file.body[start as usize..end as usize]),
                    HeaderValue::from_str(&format!("bytes {start}-{}/{len}", end - 1))
                        .ok()
                        .map(|v| (header::CONTENT_RANGE, v)),
                )
            }
            Ranges::Some(ranges) => {
                let (content_type, body) = multipart(file, &ranges);
                (StatusCode::PARTIAL_CONTENT, content_type, body.into(), None)
            }
        };
        let mut resp = self.start(status);
        let h = resp.headers_mut();
        if let Ok(content_type) = HeaderValue::from_str(&content_type) {
            h.insert(header::CONTENT_TYPE, content_type);
        }
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(content.len()));
        validators(h, false);
        if let Some((name, value)) = part {
            h.insert(name, value);
        }
        if !self.head {
            *resp.body_mut() = Body::from(content);
        }
        resp
    }

    /// A body sent without a length (nginx's gzipped answers): in chunks over HTTP/1.1, with
    /// no Content-Length over HTTP/2; nothing after HEAD.
    fn gzipped_body(&self, bytes: &'static [u8]) -> Body {
        Body::new(Unsized((!self.head).then(|| Bytes::from_static(bytes))))
    }
}

/// Whether an HTTP/1 connection stays open after this request, as nginx decides it (it
/// closes one after its keepalive_requests too).
fn keep_alive(parts: &Parts) -> bool {
    let last = parts
        .extensions
        .get::<crate::public::RequestNumber>()
        .is_some_and(|n| n.0 >= crate::public::KEEPALIVE_REQUESTS);
    if last {
        return false;
    }
    let connection = |token: &str| {
        parts.headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    match parts.version {
        Version::HTTP_11 => !connection("close"),
        Version::HTTP_10 => connection("keep-alive"),
        _ => false,
    }
}

/// Whether nginx's `gzip on` would compress the answer: a request of HTTP/1.1 or later,
/// not through a proxy (`Via`; `gzip_proxied` is off), whose first `Accept-Encoding`
/// takes gzip as ngx_http_gzip_ok reads it.
fn gzip(parts: &Parts) -> bool {
    if parts.version < Version::HTTP_11 || parts.headers.contains_key(header::VIA) {
        return false;
    }
    parts.headers.get(header::ACCEPT_ENCODING).is_some_and(|ae| accepts_gzip(ae.as_bytes()))
}

/// ngx_http_gzip_accept_encoding: a `gzip` token (at the start, or after a comma or a
/// space), then the end, a comma, or a `q` that is not zero. It also covers nginx's fast
/// path for a value starting `gzip,`.
fn accepts_gzip(ae: &[u8]) -> bool {
    let mut from = 0;
    let after = loop {
        let Some(at) = ae[from..].windows(4).position(|w| w.eq_ignore_ascii_case(b"gzip")) else {
            return false;
        };
        let at = from + at;
        if at == 0 || matches!(ae[at - 1], b',' | b' ') {
            break &ae[at + 4..];
        }
        from = at + 4;
    };
    let mut rest = after.iter();
    loop {
        match rest.next() {
            None | Some(b',') => return true,
            Some(b' ') => {}
            Some(b';') => break,
            Some(_) => return false,
        }
    }
    loop {
        match rest.next() {
            None => return true,
            Some(b'q' | b'Q') => break,
            Some(b' ') => {}
            Some(_) => return false,
        }
    }
    let rest = rest.as_slice();
    match rest.split_first() {
        Some((b'=', q)) if !q.is_empty() => quantity(q) > 0,
        _ => false,
    }
}

/// ngx_http_gzip_quantity: a q-value in thousandths, 0 for a malformed one or one over 1.
fn quantity(q: &[u8]) -> u32 {
    let mut q = q.iter();
    let mut value = match q.next() {
        Some(&c @ (b'0' | b'1')) => u32::from(c - b'0') * 1000,
        _ => return 0,
    };
    match q.next() {
        None | Some(b',' | b' ') => return value,
        Some(b'.') => {}
        Some(_) => return 0,
    }
    let mut scale = 100;
    for &c in q {
        match c {
            b',' | b' ' => break,
            b'0'..=b'9' if scale > 0 => {
                value += u32::from(c - b'0') * scale;
                scale /= 10;
            }
            _ => return 0,
        }
    }
    if value > 1000 { 0 } else { value }
}

/// nginx's test for Internet Explorer: a User-Agent with "MSIE " and something after it, and
/// not Opera.
pub(crate) fn msie(agent: &[u8]) -> bool {
    let found = agent.windows(5).position(|w| w == b"MSIE ");
    found.is_some_and(|at| at + 7 < agent.len()) && !agent.windows(5).any(|w| w == b"Opera")
}

/// nginx's reason phrase for an error status, where it differs from hyper's.
pub(crate) fn nginx_reason(status: StatusCode) -> &'static str {
    match status {
        StatusCode::METHOD_NOT_ALLOWED => "Not Allowed",
        StatusCode::URI_TOO_LONG => "Request-URI Too Large",
        StatusCode::RANGE_NOT_SATISFIABLE => "Requested Range Not Satisfiable",
        other => other.canonical_reason().unwrap_or(""),
    }
}

/// Whether nginx closes the connection after this error: after a request it could not read
/// or will not serve (ngx_http_special_response_handler).
fn closes(status: StatusCode) -> bool {
    status == too_large()
        || matches!(
            status,
            StatusCode::BAD_REQUEST
                | StatusCode::PAYLOAD_TOO_LARGE
                | StatusCode::URI_TOO_LONG
                | StatusCode::INTERNAL_SERVER_ERROR
                | StatusCode::NOT_IMPLEMENTED
                | StatusCode::HTTP_VERSION_NOT_SUPPORTED
        )
}

/// The status line's code: nginx's own 494 goes out as 400.
pub(crate) fn on_the_wire(status: StatusCode) -> StatusCode {
    if status == too_large() { StatusCode::BAD_REQUEST } else { status }
}

/// The page nginx writes for an error status.
pub(crate) fn error_page(status: StatusCode, msie: bool) -> String {
    let (title, heading) = if status == too_large() {
        let heading = "<center><h1>400 Bad Request</h1></center>\r\n\
                       <center>Request Header Or Cookie Too Large</center>";
        ("400 Request Header Or Cookie Too Large".to_string(), heading.to_string())
    } else {
        let line = format!("{} {}", status.as_u16(), nginx_reason(status));
        (line.clone(), format!("<center><h1>{line}</h1></center>"))
    };
    let mut page = format!(
        "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n{heading}\r\n\
         <hr><center>{SERVER}</center>\r\n</body>\r\n</html>\r\n"
    );
    if msie {
        for _ in 0..6 {
            page.push_str("<!-- a padding to disable MSIE and Chrome friendly error page -->\r\n");
        }
    }
    page
}

/// The request path as nginx resolves it: percent-decoded, slashes merged, `.` and `..`
/// segments applied. A bad escape, a NUL or a `..` above the root is an error (400).
fn normalise(raw: &[u8]) -> Result<Vec<u8>, ()> {
    let mut decoded = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = match raw[i] {
            b'%' => {
                let hex = |at: usize| raw.get(at).and_then(|c| (*c as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else { return Err(()) };
                i += 2;
                (hi * 16 + lo) as u8
            }
            b => b,
        };
        if b == 0 {
            return Err(());
        }
        decoded.push(b);
        i += 1;
    }
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut directory = true;
    for segment in decoded.split(|&b| b == b'/') {
        directory = true;
        match segment {
            b"" | b"." => {}
            b".." => {
                segments.pop().ok_or(())?;
            }
            name => {
                segments.push(name);
                directory = false;
            }
        }
    }
    let mut path = Vec::with_capacity(decoded.len());
    for segment in &segments {
        path.push(b'/');
        path.extend_from_slice(segment);
    }
    if directory || path.is_empty() {
        path.push(b'/');
    }
    Ok(path)
}

/// A date header's value as seconds since the epoch, if it parses.
fn date(headers: &HeaderMap, name: header::HeaderName) -> Option<Option<u64>> {
    let value = headers.get(name)?;
    let parsed = value.to_str().ok().and_then(|v| httpdate::parse_http_date(v).ok());
    Some(parsed.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()))
}

/// nginx's test of an entity tag list (`If-Match`, `If-None-Match`): `*`, or one of the
/// tags equal to ours, weak ones counting only where `weak` allows.
fn etag_matches(list: &HeaderValue, etag: &str, weak: bool) -> bool {
    let list = list.as_bytes();
    if list == b"*" {
        return true;
    }
    list.split(|&b| b == b',').any(|tag| {
        let tag = tag.trim_ascii();
        let tag = match tag.strip_prefix(b"W/") {
            Some(strong) if weak => strong,
            _ => tag,
        };
        tag == etag.as_bytes()
    })
}

/// `If-Unmodified-Since` and `If-Match`: false answers 412.
fn precondition_holds(h: &HeaderMap, etag: &str) -> bool {
    if let Some(since) = date(h, header::IF_UNMODIFIED_SINCE)
        && since.is_none_or(|since| since < MTIME)
    {
        return false;
    }
    h.get(header::IF_MATCH).is_none_or(|list| etag_matches(list, etag, false))
}

/// `If-Modified-Since` (an exact match, nginx's default) and `If-None-Match`: true answers
/// 304.
fn not_modified(h: &HeaderMap, etag: &str) -> bool {
    let since = date(h, header::IF_MODIFIED_SINCE);
    let none_match = h.get(header::IF_NONE_MATCH);
    if since.is_none() && none_match.is_none() {
        return false;
    }
    since.is_none_or(|since| since == Some(MTIME))
        && none_match.is_none_or(|list| etag_matches(list, etag, true))
}

/// `If-Range`: a range is served only if the validator is still ours.
fn if_range_holds(h: &HeaderMap, etag: &str) -> bool {
    let Some(value) = h.get(header::IF_RANGE) else { return true };
    if value.as_bytes().starts_with(b"\"") || value.as_bytes().starts_with(b"W/") {
        return value.as_bytes() == etag.as_bytes();
    }
    date(h, header::IF_RANGE).flatten() == Some(MTIME)
}

#[derive(Debug, PartialEq)]
enum Ranges {
    /// The whole file, with 200.
    Whole,
    /// 416.
    Unsatisfiable,
    /// Half-open byte ranges, with 206.
    Some(Vec<(u64, u64)>),
}

/// A `Range` header as nginx's `ngx_http_range_parse` reads it.
fn parse_ranges(value: &[u8], len: u64) -> Ranges {
    let Some(spec) = value.get(..6).filter(|p| p.eq_ignore_ascii_case(b"bytes=")) else {
        return Ranges::Whole;
    };
    let mut c = Cursor { bytes: &value[spec.len()..], at: 0 };
    let mut ranges = Vec::new();
    let mut size = 0u64;
    loop {
        c.spaces();
        let (start, end) = if c.peek() == b'-' {
            c.at += 1;
            let Some(suffix) = c.last_number() else { return Ranges::Unsatisfiable };
            (len.saturating_sub(suffix), len)
        } else {
            let Some(start) = c.number() else { return Ranges::Unsatisfiable };
            c.spaces();
            if c.peek() != b'-' {
                return Ranges::Unsatisfiable;
            }
            c.at += 1;
            c.spaces();
            if matches!(c.peek(), b',' | 0) {
                (start, len)
            } else {
                let Some(last) = c.last_number() else { return Ranges::Unsatisfiable };
                (start, if last >= len { len } else { last + 1 })
            }
        };
        if start < end {
            ranges.push((start, end));
            size += end - start;
        } else if start == 0 {
            return Ranges::Whole;
        }
        if c.peek() != b',' {
            break;
        }
        c.at += 1;
    }
    if ranges.is_empty() {
        Ranges::Unsatisfiable
    } else if size > len {
        Ranges::Whole
    } else {
        Ranges::Some(ranges)
    }
}

/// A position in a `Range` header's byte ranges; past the end reads as NUL, as nginx's
/// string does.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> u8 {
        self.bytes.get(self.at).copied().unwrap_or(0)
    }

    fn spaces(&mut self) {
        while self.peek() == b' ' {
            self.at += 1;
        }
    }

    /// At least one digit; none past nginx's cutoff (off_t's maximum).
    fn number(&mut self) -> Option<u64> {
        if !self.peek().is_ascii_digit() {
            return None;
        }
        let mut n: u64 = 0;
        while self.peek().is_ascii_digit() {
            n = n.checked_mul(10)?.checked_add(u64::from(self.peek() - b'0'))?;
            self.at += 1;
        }
        (n <= i64::MAX as u64).then_some(n)
    }

    /// The number that ends a range, followed by spaces and then `,` or the end.
    fn last_number(&mut self) -> Option<u64> {
        let n = self.number()?;
        self.spaces();
        matches!(self.peek(), b',' | 0).then_some(n)
    }
}

/// nginx numbers its multipart boundaries from one counter per server, from 1.
static BOUNDARY: AtomicU64 = AtomicU64::new(0);

/// A `multipart/byteranges` answer, as nginx writes it: its content type and body.
fn multipart(file: &File, ranges: &[(u64, u64)]) -> (String, Vec<u8>) {
    let boundary = format!("{:020}", BOUNDARY.fetch_add(1, Ordering::Relaxed) + 1);
    let len = file.body.len();
    let mut body = Vec::new();
    for &(start, end) in ranges {
        body.extend_from_slice(
            format!(
                "\r\n--{boundary}\r\nContent-Type: {}\r\nContent-Range: bytes {start}-{}/{len}\r\n\r\n",
                file.content_type,
                end - 1
            )
            .as_bytes(),
        );
        body.extend_from_slice(&file.body[start as usize..end as usize]);
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/byteranges; boundary={boundary}"), body)
}

/// A body that, unlike `Body::from`, does not say its length: nothing (a 304's), or one
/// piece (a gzipped page's).
struct Unsized(Option<Bytes>);

impl http_body::Body for Unsized {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.take().map(|bytes| Ok(http_body::Frame::data(bytes))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        use std::io::Read;
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn gzipped_pages_are_their_pages() {
        for file in FILES {
            match file.gzipped {
                Some(gz) => assert_eq!(gunzip(gz), file.body, "{:?}", file.path),
                None => assert_ne!(file.content_type, "text/html", "nginx gzips every page"),
            }
        }
        let not_found = StatusCode::NOT_FOUND;
        assert_eq!(gunzip(NOT_FOUND_GZ), error_page(not_found, false).as_bytes());
        assert_eq!(gunzip(NOT_FOUND_MSIE_GZ), error_page(not_found, true).as_bytes());
    }

    #[test]
    fn accept_encoding_reads_as_nginx_reads_it() {
        let takes = |ae: &str| {
            let (parts, ()) = axum::http::Request::builder()
                .header(header::ACCEPT_ENCODING, ae)
                .body(())
                .unwrap()
                .into_parts();
            gzip(&parts)
        };
        for yes in [
            "gzip",
            "gzip, deflate, br",
            "deflate, gzip",
            "br,GZIP",
            "gzip;q=0.5",
            "x, gzip ;q=1",
            "gzip;q=0.001",
            "gzip; q=0.5",
            "x,gzip",
            "gzip;q=1.000",
        ] {
            assert!(takes(yes), "{yes}");
        }
        for no in [
            "",
            "gzi",
            "deflate",
            "xgzip",
            "gzipx",
            "gzip;q=0",
            "gzip;q=0.000",
            "gzip;q=",
            "gzip;q=2",
            "x-gzip",
            "gzip;q=1.5",
            "gzip;q=0.0000",
            "gzipx, gzip",
        ] {
            assert!(!takes(no), "{no}");
        }
    }

    #[test]
    fn last_modified_is_the_mtime() {
        let mtime = UNIX_EPOCH + std::time::Duration::from_secs(MTIME);
        assert_eq!(httpdate::fmt_http_date(mtime), LAST_MODIFIED);
    }

    #[test]
    fn paths_resolve_as_nginx_resolves_them() {
        let ok = |raw: &str, want: &str| {
            assert_eq!(normalise(raw.as_bytes()).as_deref(), Ok(want.as_bytes()), "{raw}");
        };
        ok("/", "/");
        ok("//about.html", "/about.html");
        ok("/./about.html", "/about.html");
        ok("/x/../about.html", "/about.html");
        ok("/%61bout.html", "/about.html");
        ok("/about.html/.", "/about.html/");
        ok("/about.html/..", "/");
        ok("/.", "/");
        ok("/a%2fb", "/a/b");
        for bad in ["/..", "/../about.html", "/x/../../a", "/%2e%2e/a", "/%zz", "/%4", "/a%00b"] {
            assert_eq!(normalise(bad.as_bytes()), Err(()), "{bad}");
        }
    }

    #[test]
    fn ranges_parse_as_nginx_parses_them() {
        let r = |v: &str| parse_ranges(v.as_bytes(), 23);
        assert_eq!(r("bytes=0-10"), Ranges::Some(vec![(0, 11)]));
        assert_eq!(r("bytes=5-"), Ranges::Some(vec![(5, 23)]));
        assert_eq!(r("bytes=-5"), Ranges::Some(vec![(18, 23)]));
        assert_eq!(r("bytes=-100"), Ranges::Some(vec![(0, 23)]));
        assert_eq!(r("bytes=20-30"), Ranges::Some(vec![(20, 23)]));
        assert_eq!(r("bytes= 0 - 1 , 3-4"), Ranges::Some(vec![(0, 2), (3, 5)]));
        assert_eq!(r("BYTES=0-1"), Ranges::Some(vec![(0, 2)]));
        assert_eq!(r("items=0-1"), Ranges::Whole);
        assert_eq!(r("bytes=0-22,0-22"), Ranges::Whole, "more than the file");
        for bad in ["bytes=100-200", "bytes=23-", "bytes=-0", "bytes=foo", "bytes=1-x", "bytes="] {
            assert_eq!(r(bad), Ranges::Unsatisfiable, "{bad}");
        }
        assert_eq!(r("bytes=99999999999999999999-"), Ranges::Unsatisfiable, "overflow");
    }

    #[test]
    fn error_pages_are_nginx_pages() {
        let page = error_page(StatusCode::METHOD_NOT_ALLOWED, false);
        assert_eq!(page.len(), 157);
        assert!(page.starts_with("<html>\r\n<head><title>405 Not Allowed</title>"));
        assert_eq!(error_page(StatusCode::NOT_FOUND, false).len(), 153);
        assert_eq!(error_page(StatusCode::NOT_FOUND, true).len(), 555);
        assert_eq!(error_page(StatusCode::RANGE_NOT_SATISFIABLE, false).len(), 197);
        assert_eq!(error_page(StatusCode::PRECONDITION_FAILED, false).len(), 173);
    }
}
