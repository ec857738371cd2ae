//! Request bodies: gzip (by header or magic bytes), PostHog's form and base64 encodings,
//! and the size bound applied *after* decompression so a gzip bomb costs at most the bound.

use std::io::Read;

use base64::Engine;
use flate2::read::MultiGzDecoder;

use super::IngestError;

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// How the body was sent, from headers and query string.
#[derive(Debug, Default, Clone)]
pub struct Encoding {
    /// `Content-Encoding: gzip` (or PostHog's `?compression=gzip-js`).
    pub gzip: bool,
    /// `Content-Type: application/x-www-form-urlencoded` (older posthog-js: `data=<base64>`).
    pub form: bool,
    /// PostHog's `?compression=base64`.
    pub base64: bool,
}

/// Decodes a request body into JSON bytes no longer than `limit`.
pub fn decode(raw: &[u8], encoding: &Encoding, limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut bytes = if encoding.form && !looks_like_json(raw) {
        form_data_field(raw)?
    } else {
        raw.to_vec()
    };
    if encoding.base64 || (encoding.form && !looks_like_json(&bytes)) {
        bytes = decode_base64(&bytes)?;
    }
    if encoding.gzip || bytes.starts_with(&GZIP_MAGIC) {
        bytes = gunzip(&bytes, limit)?;
    }
    if bytes.len() > limit {
        return Err(IngestError::TooLarge(format!(
            "request body is {} bytes; the limit is {limit} bytes (after decompression)",
            bytes.len()
        )));
    }
    Ok(bytes)
}

fn looks_like_json(bytes: &[u8]) -> bool {
    matches!(
        bytes.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

fn gunzip(bytes: &[u8], limit: usize) -> Result<Vec<u8>, IngestError> {
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4).min(limit + 1));
    // A body may be several gzip members one after another (RFC 1952 allows it; some
    // clients compress as they stream): all of them are the body.
    let read = MultiGzDecoder::new(bytes)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| IngestError::InvalidBody(format!("body is not valid gzip: {e}")))?;
    if read > limit {
        return Err(IngestError::TooLarge(format!(
            "request body is over {limit} bytes after decompression"
        )));
    }
    Ok(out)
}

fn decode_base64(bytes: &[u8]) -> Result<Vec<u8>, IngestError> {
    let trimmed: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(&trimmed)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE.decode(&trimmed))
        .map_err(|e| IngestError::InvalidBody(format!("body is not valid base64: {e}")))
}

/// The `data` field of a urlencoded form body.
fn form_data_field(raw: &[u8]) -> Result<Vec<u8>, IngestError> {
    form_urlencoded::parse(raw)
        .find(|(key, _)| key == "data")
        .map(|(_, value)| value.into_owned().into_bytes())
        .ok_or_else(|| IngestError::InvalidBody("form body has no `data` field".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compression, write::GzEncoder};
    use std::io::Write;

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    #[test]
    fn plain_json_passes_through() {
        let body = decode(br#"{"a":1}"#, &Encoding::default(), 100).unwrap();
        assert_eq!(body, br#"{"a":1}"#);
    }

    #[test]
    fn gzip_is_found_by_magic_bytes() {
        let body = decode(&gzip(br#"{"a":1}"#), &Encoding::default(), 100).unwrap();
        assert_eq!(body, br#"{"a":1}"#);
    }

    #[test]
    fn concatenated_gzip_members_are_one_body() {
        let mut two = gzip(br#"{"batch":[{"a":"#);
        two.extend(gzip(br#"1}]}"#));
        let body = decode(&two, &Encoding::default(), 100).unwrap();
        assert_eq!(body, br#"{"batch":[{"a":1}]}"#);
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit() {
        let mut encoder = GzEncoder::new(Vec::new(), Compression::best());
        encoder.write_all(&vec![b' '; 50_000_000]).unwrap();
        let bomb = encoder.finish().unwrap();
        assert!(bomb.len() < 100_000);
        let err = decode(&bomb, &Encoding::default(), 500 * 1024).unwrap_err();
        assert!(matches!(err, IngestError::TooLarge(_)));
    }

    #[test]
    fn posthog_form_base64() {
        let data = base64::engine::general_purpose::STANDARD.encode(br#"{"event":"x"}"#);
        let form = format!("data={}&ver=1", data.replace('=', "%3D"));
        let encoding = Encoding {
            form: true,
            ..Default::default()
        };
        assert_eq!(
            decode(form.as_bytes(), &encoding, 100).unwrap(),
            br#"{"event":"x"}"#
        );
    }

    #[test]
    fn broken_gzip_is_a_clear_error() {
        let encoding = Encoding {
            gzip: true,
            ..Default::default()
        };
        let err = decode(b"\x1f\x8bnot gzip at all", &encoding, 100).unwrap_err();
        assert!(err.to_string().contains("gzip"), "{err}");
    }

    #[test]
    fn a_form_field_survives_truncated_escapes() {
        assert_eq!(form_data_field(b"data=a%4").unwrap(), b"a%4");
        assert_eq!(form_data_field(b"x=1&data=a%41+b").unwrap(), b"aA b");
        assert_eq!(form_data_field(b"data=%").unwrap(), b"%");
        assert!(form_data_field(b"other=1").is_err());
    }
}
