//! One place that turns any error into an HTTP status and a retry decision.
//!
//! Each component keeps its own typed error (thiserror) and says which [`ErrorKind`] each
//! variant is and which stable `code` it carries; the API answers `{"code", "message"}` with
//! the status of that kind. Clients decide to retry from the status alone (Segment's and
//! PostHog's SDKs retry 5xx and 429 and give up on other 4xx), so the kind must be right.

/// What kind of failure an error is: the user's fault or ours, retryable or not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input is wrong; sending it again will not help. 400.
    InvalidInput,
    /// No valid key was presented. 401.
    Unauthorized,
    /// A usage limit refuses the request; the body carries the upgrade path. 402.
    PaymentRequired,
    /// The key is valid but may not do this. 403.
    Forbidden,
    /// The thing asked for does not exist. 404.
    NotFound,
    /// The method is not supported on this route. 405.
    MethodNotAllowed,
    /// The request did not arrive within its time bound (a body sent too slowly). 408.
    RequestTimeout,
    /// The input is over a size bound. 413.
    TooLarge,
    /// Too many requests; retry after the given delay. 429.
    RateLimited,
    /// A dependency (JetStream) is unavailable; retry later, nothing was half-stored. 503.
    Unavailable,
    /// The work took longer than its limit. 504 for queries.
    Timeout,
    /// Our fault. 500.
    Internal,
}

impl ErrorKind {
    /// The HTTP status of this kind.
    pub fn http_status(self) -> u16 {
        match self {
            Self::InvalidInput => 400,
            Self::Unauthorized => 401,
            Self::PaymentRequired => 402,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::RequestTimeout => 408,
            Self::TooLarge => 413,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
            Self::Timeout => 504,
            Self::Internal => 500,
        }
    }

    /// Whether the same request may succeed later.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::RequestTimeout
                | Self::RateLimited
                | Self::Unavailable
                | Self::Timeout
                | Self::Internal
        )
    }
}

/// Implemented by every error that can reach a client.
pub trait Classify: std::fmt::Display {
    /// Which kind of failure this is.
    fn kind(&self) -> ErrorKind;
    /// A stable machine-readable code (`invalid_json`, `stream_unavailable`, …).
    fn code(&self) -> &'static str;
    /// Seconds the client should wait before retrying, for 429 and 503.
    fn retry_after(&self) -> Option<u64> {
        match self.kind() {
            ErrorKind::Unavailable | ErrorKind::RateLimited => Some(1),
            _ => None,
        }
    }
}

/// A refusal carried across a component boundary with its classification intact: the meter's
/// consume refused by ingest's admission (a backlog, a full disk) answers exactly as ingest
/// would.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    /// The kind of the original error.
    pub kind: ErrorKind,
    /// Its code.
    pub code: &'static str,
    /// Its message.
    pub message: String,
    /// Its `Retry-After`.
    pub retry_after: Option<u64>,
}

impl Refused {
    /// The refusal `error` makes.
    pub fn of(error: &impl Classify) -> Self {
        Self {
            kind: error.kind(),
            code: error.code(),
            message: error.to_string(),
            retry_after: error.retry_after(),
        }
    }
}

impl Classify for Refused {
    fn kind(&self) -> ErrorKind {
        self.kind
    }

    fn code(&self) -> &'static str {
        self.code
    }

    fn retry_after(&self) -> Option<u64> {
        self.retry_after
    }
}
