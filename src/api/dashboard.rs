//! The dashboard: a page served by northstar itself (no internet needed), whose script reads
//! the same API as everyone else with the key its user enters (an analyst key or the admin
//! key, kept in the tab's `sessionStorage`, sent as `Authorization: Bearer`; no cookies, so no
//! CSRF). The assets are embedded in the binary; a strict `Content-Security-Policy` lets the
//! page load only them and talk only to this server, and the script puts every value in the
//! page as text.

use http::{HeaderValue, header};

use super::respond::{self, HttpResponse};

/// One of the page's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asset {
    /// `GET /dashboard`: the page.
    Page,
    /// `GET /dashboard/app.js`.
    Script,
    /// `GET /dashboard/app.css`.
    Style,
}

impl Asset {
    /// The asset at `path`, if any.
    pub fn at(path: &str) -> Option<Self> {
        match path {
            "/dashboard" | "/dashboard/" | "/dashboard/index.html" => Some(Self::Page),
            "/dashboard/app.js" => Some(Self::Script),
            "/dashboard/app.css" => Some(Self::Style),
            _ => None,
        }
    }
}

/// What the page may load and call: its own files and this server's API, nothing else.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data: blob:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

/// Serves one asset with the page's security headers.
pub(crate) fn serve(asset: Asset) -> HttpResponse {
    let (content_type, body): (&'static str, &'static str) = match asset {
        Asset::Page => (
            "text/html; charset=utf-8",
            include_str!("../../assets/dashboard/index.html"),
        ),
        Asset::Script => (
            "text/javascript; charset=utf-8",
            include_str!("../../assets/dashboard/app.js"),
        ),
        Asset::Style => (
            "text/css; charset=utf-8",
            include_str!("../../assets/dashboard/app.css"),
        ),
    };
    let mut response = respond::bytes_response(200, content_type, body.as_bytes().to_vec());
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-cache"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}
