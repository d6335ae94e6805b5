//! The ordinary website the server is to everyone who has not proven the access secret.
//!
//! **Architecture Invariant:** nothing here depends on Postern state, and nothing Postern does
//! is visible here: no Postern path, header or error. A refused gate is answered by exactly
//! this code, the same way as a plain visit.

use axum::body::Body;
use axum::http::{HeaderValue, Method, Response, StatusCode, header};

struct Page {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const PAGES: &[Page] = &[
    Page {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("site/index.html"),
    },
    Page {
        path: "/index.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("site/index.html"),
    },
    Page {
        path: "/about.html",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("site/about.html"),
    },
    Page { path: "/style.css", content_type: "text/css", body: include_bytes!("site/style.css") },
    Page {
        path: "/robots.txt",
        content_type: "text/plain",
        body: include_bytes!("site/robots.txt"),
    },
];

const NOT_FOUND: &[u8] = include_bytes!("site/404.html");
/// A fixed modification time, as a static site would report for its files.
const LAST_MODIFIED: &str = "Tue, 14 Oct 2025 09:12:44 GMT";

/// The site's answer to `method path`.
pub(crate) fn respond(method: &Method, path: &str) -> Response<Body> {
    let page = PAGES.iter().find(|p| p.path == path);
    let (status, content_type, body) = match page {
        Some(p) => (StatusCode::OK, p.content_type, p.body),
        None => (StatusCode::NOT_FOUND, "text/html; charset=utf-8", NOT_FOUND),
    };
    if method != Method::GET && method != Method::HEAD {
        let mut resp = Response::new(Body::from(NOT_FOUND));
        *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
        return resp;
    }
    let len = body.len();
    let mut resp =
        Response::new(if method == Method::HEAD { Body::empty() } else { Body::from(body) });
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::OK {
        h.insert(header::LAST_MODIFIED, HeaderValue::from_static(LAST_MODIFIED));
    }
    resp
}
