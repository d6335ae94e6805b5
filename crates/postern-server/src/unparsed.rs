//! The site's answer to an HTTP/1 request hyper cannot parse, written as nginx writes it.
//!
//! hyper answers such a request with an empty 400 of its own; vendor/hyper's
//! `parse_error_answer` hook hands the bytes read so far to [`answer`] instead. nginx reads the
//! request line its own way, so the answer depends on where the request goes wrong:
//!
//! - a bad request line: 400, or 414 once the line has overflowed nginx's 8 KiB buffer;
//! - an HTTP version above 1 (`HTTP/2.0` in a request line, `PRI * HTTP/2.0`'s preface is a bad
//!   method): 505;
//! - a request line without a version (HTTP/0.9): the file itself, or the error page, with
//!   no status line or headers;
//! - header lines that overflow nginx's buffers: `400 Request Header Or Cookie Too Large`;
//! - an unknown `Transfer-Encoding` on otherwise well-formed lines: 501;
//! - anything else in the headers: 400.
//!
//! Some requests nginx takes and hyper does not are still answered 400 here (listed in
//! docs/circumvention.md): a minor version above 1 (`HTTP/1.2`), spaces after the version, a
//! header line without a colon or with a control byte, more than 100 header lines.

use std::time::SystemTime;

use axum::http::StatusCode;

use crate::site;

/// What nginx writes to a request hyper could not parse, given the bytes read of it. The
/// connection closes after it. (Public for the fuzz target `site_unparsed`.)
pub fn answer(read: &[u8]) -> Option<Vec<u8>> {
    Some(match verdict(read) {
        Verdict::Simple(body) => body,
        Verdict::Error { status, head, msie } => error(status, head, msie),
    })
}

#[derive(Debug, PartialEq)]
enum Verdict {
    /// An HTTP/0.9 request's answer: the body alone.
    Simple(Vec<u8>),
    /// An error page with nginx's headers; only the headers after HEAD, and the page padded
    /// for Internet Explorer if nginx read its User-Agent.
    Error { status: StatusCode, head: bool, msie: bool },
}

fn verdict(read: &[u8]) -> Verdict {
    // nginx skips empty lines before a request line.
    let start = read.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(read.len());
    let mut r = Reader { bytes: &read[start..], at: 0 };
    let method = r.take_while(site::method_byte);
    let head = method == b"HEAD";
    let bad = |at: usize| {
        let status = if at >= site::LARGE_BUFFER {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::BAD_REQUEST
        };
        Verdict::Error { status, head: head && status == StatusCode::BAD_REQUEST, msie: false }
    };
    if method.is_empty() || r.take_while(|b| b == b' ').is_empty() {
        return bad(r.at);
    }
    let target = r.take_while(|b| b > b' ' && b != 0x7f);
    if target.is_empty() || !(target[0] == b'/' || target[0].is_ascii_alphabetic()) {
        return bad(r.at);
    }
    r.take_while(|b| b == b' ');
    if r.line_end() {
        return Verdict::Simple(simple(method, target));
    }
    // nginx's version: a major number that does not start with 0, a dot, a minor number.
    if !r.literal(b"HTTP/") || !r.bytes.get(r.at).is_some_and(|b| (b'1'..=b'9').contains(b)) {
        return bad(r.at);
    }
    if r.number() > 1 {
        return Verdict::Error {
            status: StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            head,
            msie: false,
        };
    }
    if !r.literal(b".") || !r.bytes.get(r.at).is_some_and(u8::is_ascii_digit) {
        return bad(r.at);
    }
    let minor = r.number();
    if minor > 999 {
        return bad(r.at);
    }
    r.take_while(|b| b == b' ');
    if !r.line_end() {
        return bad(r.at);
    }
    // The header lines, each to its line feed; the last one may be cut short.
    let request_line = r.at;
    let lines: Vec<&[u8]> = r.bytes[request_line..].split_inclusive(|&b| b == b'\n').collect();
    let lengths = std::iter::once(request_line).chain(lines.iter().map(|line| line.len()));
    // The header lines as nginx reads them, up to the first it cannot (nginx stops there).
    let (mut msie, mut unknown_coding, mut well_formed) = (false, false, true);
    for line in lines.iter().map(|line| line.trim_ascii_end()).take_while(|line| !line.is_empty()) {
        let field = line.iter().position(|&b| b == b':').map(|colon| line.split_at(colon));
        let Some((name, value)) = field.filter(|(name, value)| {
            !name.is_empty() && name.iter().all(|&b| token_byte(b)) && !value.contains(&0)
        }) else {
            well_formed = false;
            break;
        };
        let value = value[1..].trim_ascii();
        if name.eq_ignore_ascii_case(b"user-agent") {
            msie = site::msie(value);
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            unknown_coding = !value.eq_ignore_ascii_case(b"chunked");
        }
    }
    if let Some(status) = site::oversize(lengths) {
        return Verdict::Error { status, head, msie };
    }
    // nginx refuses an unknown coding only once it has read every header line.
    let status = if well_formed && unknown_coding && minor >= 1 {
        StatusCode::NOT_IMPLEMENTED
    } else {
        StatusCode::BAD_REQUEST
    };
    Verdict::Error { status, head, msie }
}

/// A byte of an HTTP token (RFC 9110 `tchar`).
fn token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The answer to an HTTP/0.9 request: a GET gets the file, or the error page for its path;
/// any other method gets the 400 page.
fn simple(method: &[u8], target: &[u8]) -> Vec<u8> {
    if method != b"GET" {
        return site::error_page(StatusCode::BAD_REQUEST, false).into_bytes();
    }
    // An absolute URI's path starts after its authority.
    let path = match target.windows(3).position(|w| w == b"://") {
        Some(at) if target[0] != b'/' => {
            let rest = &target[at + 3..];
            rest.iter().position(|&b| b == b'/').map_or(&b"/"[..], |slash| &rest[slash..])
        }
        _ => target,
    };
    let path = path.split(|&b| b == b'?').next().unwrap_or(path);
    match site::find(path) {
        Ok(file) => file.body.to_vec(),
        Err(status) => site::error_page(status, false).into_bytes(),
    }
}

/// nginx's error answer to a request it stopped reading: its headers and its page, and the
/// connection closed.
fn error(status: StatusCode, head: bool, msie: bool) -> Vec<u8> {
    let wire = site::on_the_wire(status);
    let page = site::error_page(status, msie);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nServer: {}\r\nDate: {}\r\nContent-Type: text/html\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        wire.as_u16(),
        site::nginx_reason(wire),
        site::SERVER,
        httpdate::fmt_http_date(SystemTime::now()),
        page.len(),
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(page.as_bytes());
    }
    out
}

/// A cursor over the request line.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take_while(&mut self, take: impl Fn(u8) -> bool) -> &'a [u8] {
        let start = self.at;
        while self.bytes.get(self.at).is_some_and(|&b| take(b)) {
            self.at += 1;
        }
        &self.bytes[start..self.at]
    }

    fn literal(&mut self, want: &[u8]) -> bool {
        let found = self.bytes[self.at..].starts_with(want);
        if found {
            self.at += want.len();
        }
        found
    }

    /// A decimal number (0 if there are no digits), saturating rather than overflowing.
    fn number(&mut self) -> u32 {
        let digits = self.take_while(|b| b.is_ascii_digit());
        digits.iter().fold(0, |n: u32, &d| n.saturating_mul(10).saturating_add(u32::from(d - b'0')))
    }

    /// The end of the request line: a line feed, or a carriage return and a line feed (or
    /// the end of what was read, after a carriage return).
    fn line_end(&mut self) -> bool {
        match self.bytes.get(self.at..) {
            Some([b'\n', ..]) => self.at += 1,
            Some([b'\r', b'\n', ..]) => self.at += 2,
            Some([b'\r']) => self.at += 1,
            _ => return false,
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(read: &[u8]) -> u16 {
        match verdict(read) {
            Verdict::Error { status, .. } => status.as_u16(),
            Verdict::Simple(_) => 9,
        }
    }

    #[test]
    fn request_lines_are_read_as_nginx_reads_them() {
        for (read, want) in [
            (&b"\x16\x03\x01\x00\xa5\x01\x00"[..], 400),
            (b"hello world\r\n\r\n", 400),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
            (b"get / HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
            (b"GET / HTTP/10.0\r\n\r\n", 505),
            (b"GET / HTTP/2", 505),
            (b"GET / HTTP/0.9\r\n\r\n", 400),
            (b"GET / HTTP/01.1\r\n\r\n", 400),
            (b"GET / HTTP/1.\r\n\r\n", 400),
            (b"GET / HTTP/1.1x\r\n\r\n", 400),
            (b"GET / HTTP/1.1\t\r\n\r\n", 400),
            (b"GET / http/1.1\r\n\r\n", 400),
            (b"GET\t/ HTTP/1.1\r\n\r\n", 400),
            (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
            (b"GET /\rab HTTP/1.1\r\n\r\n", 400),
            (b"GET /\r\n", 9),
            (b"GET / \r\n", 9),
            (b"\r\nGET /\n", 9),
            (b"GET /\rX", 400),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
            (b"POST / HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nBad Header: y\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
            (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n", 400),
        ] {
            assert_eq!(status(read), want, "{}", read.escape_ascii());
        }
        let head = verdict(b"HEAD / HTTP/1.1\r\nBad Header: y\r\n\r\n");
        assert_eq!(
            head,
            Verdict::Error { status: StatusCode::BAD_REQUEST, head: true, msie: false }
        );
        let ie = b"GET / HTTP/1.1\r\nUser-Agent: Mozilla/4.0 (compatible; MSIE 6.0)\r\nBad Header: y\r\n\r\n";
        assert_eq!(
            verdict(ie),
            Verdict::Error { status: StatusCode::BAD_REQUEST, head: false, msie: true }
        );
        let late = b"GET / HTTP/1.1\r\nBad Header: y\r\nUser-Agent: Mozilla/4.0 (compatible; MSIE 6.0)\r\n\r\n";
        assert_eq!(
            verdict(late),
            Verdict::Error { status: StatusCode::BAD_REQUEST, head: false, msie: false }
        );
    }

    #[test]
    fn sizes_overflow_where_nginx_buffers_do() {
        // Measured against nginx 1.22.1: a request line of 8,192 bytes with its line end is
        // served, one more is 414; the same for a header line (then 494); 32 header lines of
        // 1,000 bytes are served, 33 are not.
        let uri = |n: usize| format!("GET /{} HTTP/1.0\r\n\r\n", "a".repeat(n)).into_bytes();
        assert_eq!(site::oversize([5 + 8176 + 11, 2]), None);
        assert_eq!(status(&uri(8177)), 414);
        assert_eq!(status(&uri(9000)[..8500]), 414, "a line cut short");
        let field = |n: usize| {
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-A: {}\r\n\r\n", "a".repeat(n)).into_bytes()
        };
        assert_eq!(status(&field(8186)), 494);
        assert_eq!(site::oversize([16, 9, 8192, 2]), None);
        let many = |n: usize| [16, 9].into_iter().chain(std::iter::repeat_n(1000, n)).chain([2]);
        assert_eq!(site::oversize(many(32)), None);
        assert_eq!(site::oversize(many(33)), Some(site::too_large()));
        let hundreds = |n: usize| [16, 9].into_iter().chain(std::iter::repeat_n(100, n)).chain([2]);
        assert_eq!(site::oversize(hundreds(333)), None);
        assert_eq!(site::oversize(hundreds(334)), Some(site::too_large()));
    }

    #[test]
    fn simple_requests_get_the_file_alone() {
        let index = site::find(b"/").unwrap().body;
        assert_eq!(verdict(b"GET /\r\n"), Verdict::Simple(index.to_vec()));
        assert_eq!(verdict(b"GET http://x\r\n"), Verdict::Simple(index.to_vec()));
        let about = site::find(b"/about.html").unwrap().body;
        assert_eq!(verdict(b"GET /about.html?x=1\r\n"), Verdict::Simple(about.to_vec()));
        assert_eq!(verdict(b"GET http://x/about.html\r\n"), Verdict::Simple(about.to_vec()));
        let page = |status| Verdict::Simple(site::error_page(status, false).into_bytes());
        assert_eq!(verdict(b"GET /nope\r\n"), page(StatusCode::NOT_FOUND));
        assert_eq!(verdict(b"GET /../x\r\n"), page(StatusCode::BAD_REQUEST));
        assert_eq!(verdict(b"HEAD /\r\n"), page(StatusCode::BAD_REQUEST));
    }

    #[test]
    fn the_answer_is_nginx_error_answer() {
        let answer = answer(b"GET / HTTP/2.0\r\n\r\n").unwrap();
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let lines: Vec<&str> = head.split("\r\n").collect();
        assert_eq!(lines[0], "HTTP/1.1 505 HTTP Version Not Supported");
        assert_eq!(lines[1], "Server: nginx/1.22.1");
        assert!(lines[2].starts_with("Date: "));
        assert_eq!(
            lines[3..],
            ["Content-Type: text/html", "Content-Length: 187", "Connection: close"]
        );
        assert_eq!(body.len(), 187);
        let too_large = String::from_utf8(error(site::too_large(), false, false)).unwrap();
        assert!(too_large.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(too_large.contains("Content-Length: 233\r\n"));
        let head = String::from_utf8(error(StatusCode::BAD_REQUEST, true, false)).unwrap();
        assert!(head.ends_with("Connection: close\r\n\r\n"));
    }
}
