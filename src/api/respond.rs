//! Building HTTP answers: JSON bodies, `{"code","message"}` errors, CORS.

use std::convert::Infallible;

use bytes::Bytes;
use futures::Stream;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use serde::Serialize;

use crate::error::{Classify, ErrorKind};

/// The body of every answer: whole bytes, or a stream (Server-Sent Events).
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// The response type of every route.
pub(crate) type HttpResponse = Response<Body>;

/// A JSON answer with `status`.
pub fn json<T: Serialize>(status: u16, body: &T) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    bytes_response(status, "application/json", bytes)
}

/// An answer of any content type.
pub(crate) fn bytes_response(
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
) -> HttpResponse {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// An answer whose body is sent as `chunks` come: the stream ends the answer when it ends.
pub(crate) fn streaming(
    content_type: &'static str,
    chunks: impl Stream<Item = Bytes> + Send + 'static,
) -> HttpResponse {
    use futures::StreamExt;
    let frames = chunks.map(|chunk| Ok::<_, Infallible>(Frame::data(chunk)));
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The error body every route uses: `{"code", "message"}`, status and `Retry-After` from the
/// error's kind.
pub fn error(err: &dyn Classify) -> HttpResponse {
    let kind = err.kind();
    let mut response = json(
        kind.http_status(),
        &serde_json::json!({"code": err.code(), "message": err.to_string()}),
    );
    if let Some(seconds) = err.retry_after() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// A plain error for conditions of the HTTP layer itself (no route, bad method, overload).
#[derive(Debug)]
pub struct HttpError {
    /// Kind (and so status) of the failure.
    pub kind: ErrorKind,
    /// Stable code.
    pub code: &'static str,
    /// For people.
    pub message: String,
}

impl HttpError {
    /// An error of `kind` with `code` and `message`.
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Classify for HttpError {
    fn kind(&self) -> ErrorKind {
        self.kind
    }
    fn code(&self) -> &'static str {
        self.code
    }
}

/// The body of a request whose fields are all optional: an empty body is the default, any
/// other must parse (`shape` says what it should be, in the error).
pub(crate) fn optional_json<T: serde::de::DeserializeOwned + Default>(
    body: &[u8],
    shape: &str,
) -> Result<T, HttpError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        HttpError::new(
            ErrorKind::InvalidInput,
            "invalid_json",
            format!("body must be {shape}: {e}"),
        )
    })
}

/// Lets browsers call the ingest routes from any origin (the browser SDKs do), and read the
/// errors they meet.
pub(crate) fn allow_cors(response: &mut HttpResponse) {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type, Authorization, Content-Encoding"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
}

/// The answer to a CORS preflight.
pub fn preflight() -> HttpResponse {
    let mut response = bytes_response(204, "text/plain", Vec::new());
    allow_cors(&mut response);
    response
}
