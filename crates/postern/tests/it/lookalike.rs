//! To a prober, a Postern server and a relay are Debian's nginx serving a small static site:
//! the same answers to ClientHellos of several shapes, the same first HTTP/2 frames, and the
//! same HTTP/2 and HTTP/1.1 answers to ordinary, odd and malformed requests. The reference is
//! the real nginx from Debian's package, with Debian's configuration, serving a copy of the
//! site with the server's own certificate; connections left alone end as nginx's do (its
//! timeouts, and the frames it ends them with). Known differences that remain are listed in
//! docs/circumvention.md and not asked here.

use std::net::SocketAddr;

use postern_test_support::webprint::{
    self, Hello, Nginx, cipher_suite as cs, h1_request, h2_preface, h2_request, kx_group, version,
};
use postern_test_support::{TestRelay, TestServer};

use crate::bin;

/// The site's files' modification time (site.rs).
const MTIME: u64 = 1_760_433_164;
const SNI: &str = "www.example.org";

/// ClientHellos a prober might send.
fn hellos() -> Vec<(&'static str, Hello)> {
    let browser = Hello::browser();
    let tls12 = Hello { versions: vec![&version::TLS12], ..browser.clone() };
    vec![
        ("browser", browser.clone()),
        ("TLS 1.3 only", Hello { versions: vec![&version::TLS13], ..browser.clone() }),
        ("TLS 1.2 only", tls12.clone()),
        (
            "TLS 1.2, no tickets, AES-128 preferred",
            Hello {
                suites: vec![
                    cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                ],
                tickets: false,
                ..tls12
            },
        ),
        (
            "TLS 1.3, ChaCha preferred, P-256 only",
            Hello {
                versions: vec![&version::TLS13],
                suites: vec![
                    cs::TLS13_CHACHA20_POLY1305_SHA256,
                    cs::TLS13_AES_128_GCM_SHA256,
                    cs::TLS13_AES_256_GCM_SHA384,
                ],
                groups: vec![kx_group::SECP256R1],
                ..browser.clone()
            },
        ),
        ("no ALPN", Hello { alpn: vec![], ..browser.clone() }),
        // nginx also takes the HTTP/1.0 and HTTP/0.9 names.
        ("HTTP/1.0 ALPN", Hello { alpn: vec![b"http/1.0".to_vec()], ..browser.clone() }),
        ("HTTP/0.9 ALPN", Hello { alpn: vec![b"http/0.9".to_vec()], ..browser.clone() }),
        ("unknown ALPN", Hello { alpn: vec![b"spdy/3".to_vec()], ..browser }),
    ]
}

/// Request headers: name and value.
type Headers = Vec<(&'static str, &'static str)>;

/// HTTP/2 requests: method, path, headers.
fn h2_requests() -> Vec<(&'static str, &'static str, Headers)> {
    let range = |r| vec![("range", r)];
    vec![
        ("GET", "/", vec![]),
        ("GET", "/index.html", vec![]),
        ("GET", "/about.html", vec![]),
        ("GET", "/style.css", vec![]),
        ("GET", "/robots.txt", vec![]),
        ("HEAD", "/", vec![]),
        ("HEAD", "/nope", vec![]),
        ("GET", "/nope", vec![]),
        ("GET", "/about.html/", vec![]),
        ("GET", "//about.html", vec![]),
        ("GET", "/./about.html", vec![]),
        ("GET", "/x/../about.html", vec![]),
        ("GET", "/../about.html", vec![]),
        ("GET", "/about.html/..", vec![]),
        ("GET", "/%61bout.html", vec![]),
        ("GET", "/%zz", vec![]),
        ("GET", "/a%00b", vec![]),
        ("GET", "/index.html?x=1", vec![]),
        ("GET", "/ws", vec![]),
        ("POST", "/", vec![]),
        ("POST", "/nope", vec![]),
        ("PUT", "/about.html", vec![]),
        ("DELETE", "/nope", vec![]),
        ("OPTIONS", "/", vec![]),
        ("TRACE", "/nope", vec![]),
        ("GET", "/robots.txt", range("bytes=0-10")),
        ("GET", "/robots.txt", range("bytes=5-")),
        ("GET", "/robots.txt", range("bytes=-5")),
        ("GET", "/robots.txt", range("bytes=100-200")),
        ("GET", "/robots.txt", range("bytes=-0")),
        ("GET", "/robots.txt", range("bytes=0-1,3-4")),
        ("GET", "/robots.txt", range("items=0-1")),
        ("GET", "/robots.txt", range("bytes=foo")),
        ("HEAD", "/robots.txt", range("bytes=0-1")),
        ("GET", "/robots.txt", vec![("range", "bytes=0-1"), ("if-range", "\"x\"")]),
        ("GET", "/robots.txt", vec![("range", "bytes=0-1"), ("if-range", "\"68ee140c-17\"")]),
        ("GET", "/robots.txt", vec![("if-none-match", "\"68ee140c-17\"")]),
        ("GET", "/robots.txt", vec![("if-none-match", "W/\"68ee140c-17\", \"a\"")]),
        ("GET", "/robots.txt", vec![("if-modified-since", "Tue, 14 Oct 2025 09:12:44 GMT")]),
        ("GET", "/robots.txt", vec![("if-modified-since", "Tue, 14 Oct 2025 09:12:45 GMT")]),
        ("GET", "/robots.txt", vec![("if-match", "\"x\"")]),
        ("GET", "/robots.txt", vec![("if-unmodified-since", "Tue, 14 Oct 2024 09:12:44 GMT")]),
        (
            "GET",
            "/nope",
            vec![("user-agent", "Mozilla/4.0 (compatible; MSIE 8.0; Windows NT 6.1)")],
        ),
        ("GET", "/", vec![("cookie", "sid=garbage")]),
        // nginx gzips pages and its 404 page for a client that takes gzip.
        ("GET", "/", vec![("accept-encoding", "gzip, deflate, br")]),
        ("GET", "/about.html", vec![("accept-encoding", "deflate, gzip;q=0.5")]),
        ("GET", "/about.html", vec![("accept-encoding", "gzip;q=0")]),
        ("GET", "/about.html", vec![("accept-encoding", "gzip"), ("via", "1.1 proxy")]),
        ("HEAD", "/", vec![("accept-encoding", "gzip")]),
        ("GET", "/", vec![("accept-encoding", "gzip"), ("range", "bytes=0-3")]),
        ("GET", "/", vec![("accept-encoding", "gzip"), ("if-none-match", "W/\"68ee140c-2af\"")]),
        ("GET", "/style.css", vec![("accept-encoding", "gzip")]),
        ("GET", "/nope", vec![("accept-encoding", "gzip")]),
        (
            "GET",
            "/nope",
            vec![
                ("accept-encoding", "gzip"),
                ("user-agent", "Mozilla/4.0 (compatible; MSIE 8.0; Windows NT 6.1)"),
            ],
        ),
        ("POST", "/", vec![("accept-encoding", "gzip")]),
    ]
}

/// Raw HTTP/1.1 requests.
fn h1_requests() -> Vec<&'static str> {
    vec![
        "GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        "HEAD /about.html HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /robots.txt HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        "GET /nope HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n",
        "PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        "TRACE / HTTP/1.1\r\nHost: a\r\n\r\n",
        "GET /robots.txt HTTP/1.1\r\nHost: a\r\nIf-None-Match: *\r\n\r\n",
        "GET /robots.txt HTTP/1.1\r\nHost: a\r\nIf-Match: \"x\"\r\n\r\n",
        "GET /robots.txt HTTP/1.1\r\nHost: a\r\nRange: bytes=3-4\r\n\r\n",
        "GET /robots.txt HTTP/1.1\r\nHost: a\r\nRange: bytes=30-\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        "GET /about.html HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip, deflate\r\n\r\n",
        "HEAD / HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n",
        "GET /nope HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.0\r\nAccept-Encoding: gzip\r\n\r\n",
    ]
}

/// Raw HTTP/1 requests nginx refuses or reads its own way: bytes that are not HTTP (a TLS
/// record, an HTTP/2 preface where ALPN chose HTTP/1.1), HTTP/0.9, versions above 1, bad
/// methods, targets and headers, the framing headers, and heads that overflow nginx's buffers.
fn h1_refused() -> Vec<Vec<u8>> {
    let long_field = format!("GET / HTTP/1.1\r\nHost: a\r\nX-A: {}\r\n\r\n", "a".repeat(8186));
    let fields = |n: usize| {
        let field = |i: usize| format!("X-{i:04}: {}\r\n", "a".repeat(990));
        format!("GET / HTTP/1.1\r\nHost: a\r\n{}\r\n", (0..n).map(field).collect::<String>())
    };
    let short_fields = (0..200).map(|i| format!("X-{i}: y\r\n")).collect::<String>();
    let mut raw: Vec<Vec<u8>> = [
        &b"\x16\x03\x01\x00\xa5\x01\x00"[..],
        b"hello world\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/2.0\r\nHost: a\r\n\r\n",
        b"HEAD / HTTP/3.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/10.0\r\nHost: a\r\n\r\n",
        b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.x\r\nHost: a\r\n\r\n",
        b"GET / http/1.1\r\nHost: a\r\n\r\n",
        b"GET /\r\n",
        b"GET /about.html?x=1\n",
        b"GET /nope\r\n",
        b"GET /../x\r\n",
        b"POST /\r\n",
        b"GET http://a/about.html\r\n",
        b"get / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"G@T / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET  /  HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: y\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nHost: a\r\nBad Header: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nUser-Agent: Mozilla/4.0 (compatible; MSIE 6.0)\r\nBad Header: y\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a..b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: .\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a.\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: [::1]:443\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ]
    .map(<[u8]>::to_vec)
    .into();
    raw.push(format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(8177)).into());
    raw.push(long_field.into());
    raw.push(fields(32).into());
    raw.push(fields(33).into());
    raw.push(format!("GET / HTTP/1.1\r\nHost: a\r\n{short_fields}\r\n").into());
    raw
}

/// A server, a relay forwarding to it, and nginx serving the same site with the server's
/// certificate.
struct Scene {
    server: TestServer,
    relay: TestRelay,
    nginx: Nginx,
    _site: tempfile::TempDir,
}

impl Scene {
    async fn start() -> Scene {
        assert!(Nginx::installed(), "the lab's reference web server: apt-get install nginx");
        let server = TestServer::start(bin()).await;
        let link = server.bound_link().to_link_string();
        let relay = TestRelay::start(bin(), &format!("servers = [\"{link}\"]")).await;
        let site = tempfile::tempdir().unwrap();
        webprint::site_copy(site.path(), MTIME);
        let nginx = Nginx::start(
            site.path(),
            &server.data_dir.join("tls-cert.pem"),
            &server.data_dir.join("tls-key.pem"),
        )
        .await;
        Scene { server, relay, nginx, _site: site }
    }

    fn ours(&self) -> [(&'static str, SocketAddr); 2] {
        [
            ("server", self.server.listen.parse().unwrap()),
            ("relay", self.relay.listen.parse().unwrap()),
        ]
    }
}

#[tokio::test]
async fn a_server_and_a_relay_answer_as_nginx_does() {
    let scene = Scene::start().await;
    let (nginx, ours) = (&scene.nginx, scene.ours());

    for (shape, hello) in hellos() {
        // Refusals count too: nginx refuses a protocol it does not speak.
        let want = webprint::tls(nginx.addr, SNI, &hello).await;
        for (who, addr) in ours {
            let got = webprint::tls(addr, SNI, &hello).await;
            assert_eq!(got, want, "{who}, ClientHello {shape}");
        }
    }

    let want = h2_preface(nginx.addr, SNI).await;
    for (who, addr) in ours {
        assert_eq!(h2_preface(addr, SNI).await, want, "{who}: first HTTP/2 frames");
    }

    for (method, path, headers) in h2_requests() {
        let want = h2_request(nginx.addr, SNI, method, path, &headers).await;
        for (who, addr) in ours {
            let got = h2_request(addr, SNI, method, path, &headers).await;
            assert_eq!(got, want, "{who}: HTTP/2 {method} {path} {headers:?}");
        }
    }

    for raw in h1_requests() {
        let want = h1_request(nginx.addr, SNI, raw).await;
        for (who, addr) in ours {
            let got = h1_request(addr, SNI, raw).await;
            assert_eq!(got, want, "{who}: HTTP/1.1 {raw:?}");
        }
    }

    // nginx serves 1,000 requests on a connection (keepalive_requests), then closes it.
    let want = webprint::h1_one_after_another(nginx.addr, SNI, 1001).await;
    assert_eq!(want.answers, 1000, "{want:?}");
    for (who, addr) in ours {
        let got = webprint::h1_one_after_another(addr, SNI, 1001).await;
        assert_eq!(got, want, "{who}: 1,001 HTTP/1.1 requests on a connection");
    }
    let want = webprint::h2_one_after_another(nginx.addr, SNI, 1001).await;
    assert_eq!(want.answers, 1000, "{want:?}");
    for (who, addr) in ours {
        let got = webprint::h2_one_after_another(addr, SNI, 1001).await;
        assert_eq!(got, want, "{who}: 1,001 HTTP/2 streams on a connection");
    }

    for raw in h1_refused() {
        let want = h1_request(nginx.addr, SNI, &raw).await;
        for (who, addr) in ours {
            let got = h1_request(addr, SNI, &raw).await;
            assert_eq!(got, want, "{who}: HTTP/1 {}", raw.escape_ascii());
        }
    }
}

/// A connection a prober opens and leaves alone: its name, the ALPN protocol it offers
/// (none: bare TCP), and what it sends first.
type LeftAlone = (&'static str, Option<&'static [u8]>, Vec<&'static [u8]>);

/// Connections a prober opens and leaves alone.
fn left_alone() -> Vec<LeftAlone> {
    const H1: Option<&[u8]> = Some(b"http/1.1");
    const H2: Option<&[u8]> = Some(b"h2");
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
    // HEADERS (END_STREAM, END_HEADERS) on stream 1: GET https://x/ in HPACK's static table.
    const GET: &[u8] = b"\0\0\x06\x01\x05\0\0\0\x01\x82\x87\x84\x41\x01x";
    vec![
        ("TCP, nothing sent", None, vec![]),
        ("TCP, part of a ClientHello", None, vec![b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]),
        ("HTTP/1.1, no request", H1, vec![]),
        ("HTTP/1.1, part of a request head", H1, vec![b"GET / HTTP/1.1\r\nHost: x\r\n"]),
        ("HTTP/1.1, after a request", H1, vec![b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]),
        (
            "HTTP/1.1, part of a second request",
            H1,
            vec![b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET / HT"],
        ),
        // Answered at once; nginx then reads what more comes for 5 s before it closes.
        (
            "HTTP/1.1, a body that does not all come",
            H1,
            vec![b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc"],
        ),
        ("HTTP/2, no preface", H2, vec![]),
        ("HTTP/2, part of the preface", H2, vec![b"PRI * HTTP/2.0\r\n"]),
        ("HTTP/2, a wrong preface", H2, vec![b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]),
        ("HTTP/2, no stream", H2, vec![PREFACE]),
        ("HTTP/2, after a stream", H2, vec![PREFACE, GET]),
    ]
}

/// nginx ends a connection nobody uses after its client_header_timeout (60 s from the
/// start) or keepalive_timeout (75 s after a request), with a GOAWAY over HTTP/2; a server
/// that kept it open, or closed it sooner, would stand out to a prober that waits. All the
/// connections wait at once: the test takes about 76 s.
#[tokio::test]
async fn connections_left_alone_end_as_nginx_ends_them() {
    let scene = Scene::start().await;
    let cap = std::time::Duration::from_secs(90);
    let cases = left_alone();
    let mut tries = Vec::new();
    for (name, alpn, sent) in &cases {
        for (who, addr) in [("nginx", scene.nginx.addr)].into_iter().chain(scene.ours()) {
            tries.push(async move {
                (*name, who, webprint::left_alone(addr, SNI, *alpn, sent, cap).await)
            });
        }
    }
    let ended = futures_util::future::join_all(tries).await;
    for (name, _, _) in &cases {
        let of = |who: &str| {
            ended
                .iter()
                .find(|(n, w, _)| n == name && *w == who)
                .map(|(_, _, e)| e.clone())
                .unwrap()
        };
        let want = of("nginx");
        assert_ne!(want.how, "open", "{name}: nginx kept it open for {cap:?}");
        for who in ["server", "relay"] {
            let got = of(who);
            assert_eq!(
                (got.how, &got.wrote),
                (want.how, &want.wrote),
                "{who}, {name}: {got:?} against nginx's {want:?}"
            );
            assert!(
                got.after_secs.abs_diff(want.after_secs) <= 1,
                "{who}, {name}: {got:?} against nginx's {want:?}"
            );
        }
    }
}
