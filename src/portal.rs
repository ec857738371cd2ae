//! Portal tokens: short-lived credentials scoped to one customer, which a service hands to its
//! own browser front end so the page can read that customer's usage and entitlements (and show
//! an upgrade prompt) without ever holding a service key.
//!
//! A token is `pt_<payload>.<mac>`: the payload (base64url JSON: customer and expiry) signed
//! with HMAC-SHA256 under a secret the server keeps in `data/portal/secret` (32 random bytes,
//! made at first start, mode 0600). Nothing is stored per token: a token is valid until it
//! expires, across restarts, and a leaked one exposes one customer's usage for at most its
//! lifetime (`expiresIn`, at most a day). Removing the secret file revokes every token.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};

/// What every token starts with.
const PREFIX: &str = "pt_";
/// The longest a token may live.
pub const MAX_LIFETIME: Duration = Duration::from_secs(86_400);
/// A token's lifetime when the request names none.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3_600);
/// The secret's file under the data dir.
const SECRET_FILE: &str = "portal/secret";

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token this server made (or the secret changed).
    #[error("not a valid portal token")]
    Invalid,
    /// It was valid, until the time it names.
    #[error("the portal token expired at {0}; ask the service for a new one")]
    Expired(String),
}

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The customer whose usage it may read.
    #[serde(rename = "c")]
    pub customer_id: String,
    /// When it expires (UTC µs).
    #[serde(rename = "e")]
    pub expires_at: i64,
}

/// The server's signing key.
pub struct PortalKeys {
    key: hmac::Key,
}

impl std::fmt::Debug for PortalKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortalKeys(…)")
    }
}

impl PortalKeys {
    /// Loads the secret from `data_dir`, making it first if there is none.
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let path: PathBuf = data_dir.join(SECRET_FILE);
        let secret = match std::fs::read(&path) {
            Ok(bytes) if bytes.len() >= 32 => bytes,
            Ok(_) | Err(_) => {
                let mut bytes = [0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                    .map_err(|_| std::io::Error::other("no random bytes for the portal secret"))?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                crate::files::write_atomic(&path, &bytes)?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                }
                bytes.to_vec()
            }
        };
        Ok(Self::from_secret(&secret))
    }

    /// Keys from a secret (tests).
    pub fn from_secret(secret: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// A token granting `grant`.
    pub fn issue(&self, grant: &Grant) -> String {
        let payload = serde_json::to_vec(grant).unwrap_or_default();
        let body = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(payload));
        let mac = hmac::sign(&self.key, body.as_bytes());
        format!("{body}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
    }

    /// What `token` grants at `now` (UTC µs): its signature is checked in constant time.
    pub fn verify(&self, token: &str, now: i64) -> Result<Grant, TokenError> {
        let (body, mac) = token.trim().rsplit_once('.').ok_or(TokenError::Invalid)?;
        let mac = URL_SAFE_NO_PAD
            .decode(mac)
            .map_err(|_| TokenError::Invalid)?;
        hmac::verify(&self.key, body.as_bytes(), &mac).map_err(|_| TokenError::Invalid)?;
        let payload = body.strip_prefix(PREFIX).ok_or(TokenError::Invalid)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Invalid)?;
        let grant: Grant = serde_json::from_slice(&payload).map_err(|_| TokenError::Invalid)?;
        if grant.expires_at <= now {
            return Err(TokenError::Expired(crate::clock::format_micros(
                grant.expires_at,
            )));
        }
        Ok(grant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token grants its customer until it expires; any change to it, or another server's
    /// secret, makes it invalid.
    #[test]
    fn a_token_grants_one_customer_until_it_expires() {
        let keys = PortalKeys::from_secret(&[7; 32]);
        let grant = Grant {
            customer_id: "acme".into(),
            expires_at: 1_000,
        };
        let token = keys.issue(&grant);
        assert!(token.starts_with("pt_"));
        assert_eq!(keys.verify(&token, 999), Ok(grant.clone()));
        assert!(matches!(
            keys.verify(&token, 1_000),
            Err(TokenError::Expired(_))
        ));
        let other = PortalKeys::from_secret(&[8; 32]);
        assert_eq!(other.verify(&token, 0), Err(TokenError::Invalid));
        // Another customer's payload under this token's signature.
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"c":"globex","e":1000}"#);
        let mac = token.rsplit_once('.').unwrap().1;
        let forged = format!("pt_{forged_payload}.{mac}");
        assert_eq!(keys.verify(&forged, 0), Err(TokenError::Invalid));
        assert_eq!(keys.verify("pt_nonsense", 0), Err(TokenError::Invalid));
    }

    /// The secret is made once and read back: tokens outlive a restart.
    #[test]
    fn the_secret_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let first = PortalKeys::open(dir.path()).unwrap();
        let grant = Grant {
            customer_id: "acme".into(),
            expires_at: i64::MAX,
        };
        let token = first.issue(&grant);
        let again = PortalKeys::open(dir.path()).unwrap();
        assert_eq!(again.verify(&token, 0), Ok(grant));
    }
}
