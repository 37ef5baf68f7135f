//! Standard Webhooks signatures: `v1,` followed by the base64 HMAC-SHA256 of
//! `"{webhook-id}.{webhook-timestamp}.{body}"`, keyed by the endpoint's secret.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::DeliverError;

/// The prefix every signing secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";

/// Standard base64 that accepts a secret with or without its `=` padding.
const SECRET_ENGINE: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Signs one request with one secret and returns the `v1,<base64>` signature.
///
/// `secret` is `whsec_` followed by the base64 of the key, `id` is the `webhook-id` header,
/// `timestamp` the `webhook-timestamp` header in seconds, and `body` the exact request body.
///
/// # Errors
///
/// [`DeliverError::InvalidSecret`] when the secret lacks the `whsec_` prefix or its key is
/// not base64 or is empty. The error never contains the secret.
pub fn sign(secret: &str, id: &str, timestamp: u64, body: &[u8]) -> Result<String, DeliverError> {
    let invalid = |reason: String| DeliverError::InvalidSecret { reason };

    let encoded_key = secret
        .strip_prefix(SECRET_PREFIX)
        .ok_or_else(|| invalid(format!("it does not start with `{SECRET_PREFIX}`")))?;
    let key = SECRET_ENGINE.decode(encoded_key).map_err(|e| {
        invalid(format!(
            "the part after `{SECRET_PREFIX}` is not base64 ({})",
            describe(&e)
        ))
    })?;
    if key.is_empty() {
        return Err(invalid(format!("the key after `{SECRET_PREFIX}` is empty")));
    }

    let mut mac = Hmac::<Sha256>::new_from_slice(&key)
        .map_err(|e| invalid(format!("the key is unusable for HMAC ({e})")))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();

    Ok(format!("v1,{}", STANDARD.encode(digest)))
}

/// Describes a base64 error without the offending character, which belongs to the secret.
fn describe(error: &base64::DecodeError) -> String {
    match error {
        base64::DecodeError::InvalidByte(offset, _) => format!("invalid character at {offset}"),
        base64::DecodeError::InvalidLength(_) => "invalid length".to_string(),
        base64::DecodeError::InvalidLastSymbol(offset, _) => {
            format!("invalid last character at {offset}")
        }
        base64::DecodeError::InvalidPadding => "invalid padding".to_string(),
    }
}

/// Signs one request with every secret and returns the `webhook-signature` header value:
/// the signatures separated by single spaces, in the order of `secrets`.
///
/// # Errors
///
/// The first [`DeliverError::InvalidSecret`] among the secrets. With several secrets, its
/// reason names the secret's position in the list, counting from 1.
pub fn signature_header(
    secrets: &[&str],
    id: &str,
    timestamp: u64,
    body: &[u8],
) -> Result<String, DeliverError> {
    let signatures = secrets
        .iter()
        .enumerate()
        .map(|(index, secret)| {
            sign(secret, id, timestamp, body).map_err(|e| match e {
                DeliverError::InvalidSecret { reason } if secrets.len() > 1 => {
                    let position = index + 1;
                    let reason = format!("secret {position} of {}: {reason}", secrets.len());
                    DeliverError::InvalidSecret { reason }
                }
                other => other,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(signatures.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret whose key is the 24 bytes 0, 1, …, 23.
    const SECRET: &str = "whsec_AAECAwQFBgcICQoLDA0ODxAREhMUFRYX";

    #[test]
    fn sign_matches_known_vector() {
        // Computed independently with Python 3:
        // base64.b64encode(hmac.new(bytes(range(24)), b"msg_1.1700000000.{\"a\":1}",
        //                           hashlib.sha256).digest())
        let signature = sign(SECRET, "msg_1", 1_700_000_000, br#"{"a":1}"#).expect("valid secret");
        assert_eq!(signature, "v1,YOREwC5BRUvI4ezImQEgEteB7JbPr/Iy2YCZe049/5g=");
    }

    #[test]
    fn sign_accepts_unpadded_key() {
        let padded = "whsec_AAEC";
        let unpadded_needs_padding = "whsec_AAE";
        assert!(sign(padded, "id", 1, b"{}").is_ok());
        assert!(sign(unpadded_needs_padding, "id", 1, b"{}").is_ok());
    }

    #[test]
    fn sign_rejects_bad_secrets() {
        for secret in ["AAECAwQF", "whsec_", "whsec_not base64!", "whsec"] {
            let err = sign(secret, "id", 1, b"{}").expect_err("invalid secret");
            assert!(
                matches!(err, DeliverError::InvalidSecret { .. }),
                "{secret}: {err}"
            );
        }
    }

    #[test]
    fn sign_error_hides_secret() {
        let err = sign("whsec_s3cr3t!!", "id", 1, b"{}").expect_err("not base64");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn signature_header_joins_with_spaces() {
        let secrets = [SECRET, "whsec_AAEC"];
        let header = signature_header(&secrets, "msg_1", 1_700_000_000, b"{}").expect("valid");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert!(parts.iter().all(|part| part.starts_with("v1,")), "{header}");
        assert_ne!(parts[0], parts[1]);
    }
}
