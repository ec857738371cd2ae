//! Write keys: which source a key belongs to, compared in constant time and never logged.
//!
//! The Segment wire carries the key as HTTP Basic user name (`base64("KEY:")`, colon optional),
//! as `writeKey` in the body, or as a Bearer token beside a body key; PostHog carries it as
//! `api_key`/`token` in the body. Every presented candidate is checked against every key,
//! without stopping early, so timing says nothing about how close a guess was.

use base64::Engine;
use subtle::ConstantTimeEq;

use crate::config::Config;

/// The write keys of all sources.
#[derive(Clone, Default)]
pub struct WriteKeys {
    keys: Vec<(Vec<u8>, String)>,
}

impl std::fmt::Debug for WriteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WriteKeys({} keys)", self.keys.len())
    }
}

impl WriteKeys {
    /// Collects the keys of every source in the config.
    pub fn from_config(config: &Config) -> Self {
        let keys = config
            .sources
            .iter()
            .flat_map(|source| {
                source
                    .write_keys
                    .iter()
                    .map(move |key| (key.as_bytes().to_vec(), source.name.clone()))
            })
            .collect();
        Self { keys }
    }

    /// `bytes` with every write key in it replaced by `[redacted]`, so a key sent in a body
    /// (Segment's `writeKey`, PostHog's `api_key` and `properties.token`) is never stored.
    pub fn redact<'a>(&self, bytes: &'a [u8]) -> std::borrow::Cow<'a, [u8]> {
        let mut out = std::borrow::Cow::Borrowed(bytes);
        for (key, _) in &self.keys {
            if key.is_empty() || !out.windows(key.len()).any(|w| w == key.as_slice()) {
                continue;
            }
            let mut redacted = Vec::with_capacity(out.len());
            let mut rest: &[u8] = &out;
            while let Some(at) = rest.windows(key.len()).position(|w| w == key.as_slice()) {
                redacted.extend_from_slice(&rest[..at]);
                redacted.extend_from_slice(b"[redacted]");
                rest = &rest[at + key.len()..];
            }
            redacted.extend_from_slice(rest);
            out = std::borrow::Cow::Owned(redacted);
        }
        out
    }

    /// Whether any write key appears anywhere in `bytes`.
    pub fn appears_in(&self, bytes: &[u8]) -> bool {
        self.keys.iter().any(|(key, _)| {
            !key.is_empty() && bytes.windows(key.len()).any(|w| w == key.as_slice())
        })
    }

    /// Takes write keys out of what an event stores: `context.writeKey` goes, and a key
    /// inside any string of `properties` or `context` (an SDK that copies its key into every
    /// event, or a key pasted into a property) becomes `[redacted]`, as in the rejected store.
    pub fn scrub(
        &self,
        properties: &mut serde_json::Map<String, serde_json::Value>,
        context: &mut serde_json::Map<String, serde_json::Value>,
    ) {
        if self.keys.is_empty() {
            return;
        }
        context.remove("writeKey");
        for value in properties.values_mut().chain(context.values_mut()) {
            self.scrub_value(value);
        }
    }

    fn scrub_value(&self, value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(text) if self.appears_in(text.as_bytes()) => {
                let redacted = self.redact(text.as_bytes());
                *text = String::from_utf8_lossy(&redacted).into_owned();
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(|v| self.scrub_value(v)),
            serde_json::Value::Object(map) => map.values_mut().for_each(|v| self.scrub_value(v)),
            _ => {}
        }
    }

    /// Whether `candidate` is one of the write keys (constant time).
    pub fn is_key(&self, candidate: &str) -> bool {
        self.source_of(candidate).is_some()
    }

    /// Whether any key is configured at all.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The source owning `candidate`, compared against every key in constant time.
    pub fn source_of(&self, candidate: &str) -> Option<&str> {
        let candidate = candidate.as_bytes();
        let mut found: Option<&str> = None;
        for (key, source) in &self.keys {
            if bool::from(key.as_slice().ct_eq(candidate)) {
                found = Some(source);
            }
        }
        found
    }

    /// Resolves the first candidate that is a valid key; `Err(true)` if keys were presented but
    /// none is valid, `Err(false)` if none was presented.
    pub fn authenticate<'a>(&'a self, candidates: &[Option<&str>]) -> Result<&'a str, bool> {
        self.authenticate_key(candidates).map(|(_, source)| source)
    }

    /// Like [`WriteKeys::authenticate`], with the index of the matching key (for its rate
    /// limiter).
    pub fn authenticate_key<'a>(
        &'a self,
        candidates: &[Option<&str>],
    ) -> Result<(usize, &'a str), bool> {
        let mut presented = false;
        let mut found = None;
        for candidate in candidates.iter().flatten() {
            if candidate.is_empty() {
                continue;
            }
            presented = true;
            let bytes = candidate.as_bytes();
            for (index, (key, source)) in self.keys.iter().enumerate() {
                if bool::from(key.as_slice().ct_eq(bytes)) && found.is_none() {
                    found = Some((index, source.as_str()));
                }
            }
        }
        found.ok_or(presented)
    }

    /// Number of keys (one rate limiter each).
    pub fn len(&self) -> usize {
        self.keys.len()
    }
}

/// The key from `Authorization: Basic base64(key:)` (colon optional).
pub(crate) fn basic_user(authorization: Option<&str>) -> Option<String> {
    let encoded = strip_scheme(authorization?, "basic")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(match text.split_once(':') {
        Some((user, _)) => user.to_string(),
        None => text,
    })
}

/// The token of `Authorization: Bearer <token>`.
pub(crate) fn bearer_token(authorization: Option<&str>) -> Option<&str> {
    strip_scheme(authorization?, "bearer").map(str::trim)
}

/// Whether `token` is one of `keys`: every key is compared, in constant time, so the answer's
/// time says nothing of which key matched or how much of one.
pub(crate) fn is_one_of<'k>(token: &str, keys: impl IntoIterator<Item = &'k String>) -> bool {
    let mut found = false;
    for key in keys {
        found |= bool::from(token.as_bytes().ct_eq(key.as_bytes()));
    }
    found
}

fn strip_scheme<'a>(header: &'a str, scheme: &str) -> Option<&'a str> {
    let (given, rest) = header.trim().split_once(' ')?;
    given.eq_ignore_ascii_case(scheme).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceSpec;

    fn keys() -> WriteKeys {
        let mut config = Config::default();
        config.sources.push(SourceSpec {
            name: "web".into(),
            write_keys: vec!["wk_web_123".into()],
        });
        WriteKeys::from_config(&config)
    }

    #[test]
    fn basic_auth_with_and_without_colon() {
        let with = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("wk_web_123:")
        );
        let without = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("wk_web_123")
        );
        assert_eq!(basic_user(Some(&with)).as_deref(), Some("wk_web_123"));
        assert_eq!(basic_user(Some(&without)).as_deref(), Some("wk_web_123"));
        assert_eq!(basic_user(Some("Bearer x")), None);
    }

    #[test]
    fn any_valid_candidate_authenticates() {
        let keys = keys();
        assert_eq!(
            keys.authenticate(&[Some("nope"), Some("wk_web_123")]),
            Ok("web")
        );
        assert_eq!(keys.authenticate(&[Some("nope")]), Err(true));
        assert_eq!(keys.authenticate(&[None, Some("")]), Err(false));
    }
}
