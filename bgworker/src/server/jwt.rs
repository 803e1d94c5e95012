//! JWT verification for the handshake `apikey` and channel `access_token`s
//! (`docs/protocol.md`, "Connecting", "Tokens"). HS256/384/512 verify against
//! `pg_realtime.jwt_secret` (or an `oct` key of the JWKS found by `kid`);
//! RS*/PS*/ES*/EdDSA only against a JWKS key found by `kid`. A key is only
//! ever used with its own algorithm family, which rules out algorithm
//! confusion (an RSA public key used as an HMAC secret).

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::fmt;
use thiserror::Error;

/// The claims of a verified token.
#[derive(Clone, PartialEq)]
pub struct Claims {
    /// The Postgres role the token acts as.
    pub role: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    pub sub: Option<String>,
    /// Every claim.
    pub all: Map<String, Value>,
    /// The claims as the token has them, for `request.jwt.claims` (numbers
    /// exactly as written).
    pub json: String,
}

// Claims may carry personal data: keep them out of logs by default.
impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Claims")
            .field("role", &self.role)
            .field("exp", &self.exp)
            .finish_non_exhaustive()
    }
}

/// Why a token was refused. `Display` is the client-facing message.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AuthError {
    #[error("API key is missing")]
    Missing,
    #[error("Token has expired {0} seconds ago")]
    Expired(i64),
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
    #[error("Token expiration time is invalid")]
    BadExpiry,
    #[error("The token provided is not a valid JWT")]
    Malformed,
    #[error("Failed to validate JWT signature")]
    BadSignature,
    #[error("Failed to generate JWT signer, check your JWT secret or JWKS configuration")]
    NoSigner,
    #[error("The token is not valid yet (nbf is {0} seconds away)")]
    NotYetValid(i64),
    #[error("The token's audience (aud) is not the one pg_realtime.jwt_audience names")]
    WrongAudience,
}

impl AuthError {
    /// The `reason` of a join error reply: `Code: message`.
    pub fn join_reason(&self) -> String {
        let code = match self {
            AuthError::Missing
            | AuthError::Expired(_)
            | AuthError::MissingClaims
            | AuthError::BadExpiry
            | AuthError::NotYetValid(_)
            | AuthError::WrongAudience => "InvalidJWTToken",
            AuthError::Malformed => "MalformedJWT",
            AuthError::BadSignature => "JwtSignatureError",
            AuthError::NoSigner => "JwtSignerError",
        };
        format!("{code}: {self}")
    }

    /// The message of the HTTP 401 that refuses a WebSocket upgrade.
    pub fn handshake_message(&self) -> String {
        match self {
            AuthError::Expired(_) => "Token has expired".into(),
            other => other.to_string(),
        }
    }
}

/// A JWKS that could not be used.
#[derive(Debug, Error, PartialEq)]
#[error("pg_realtime.jwks is not a valid JWK set: {0}")]
pub struct JwksError(String);

/// Verifies tokens against the configured secret and keys. Cheap to share;
/// rebuilt whenever the configuration is reloaded.
#[derive(Default)]
pub struct Verifier {
    secret: Option<DecodingKey>,
    jwks: Vec<(Option<String>, Jwk)>,
    /// When set, `aud` must be (or contain) it.
    audience: Option<String>,
}

// Never print key material.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("secret", &self.secret.is_some())
            .field("jwks_keys", &self.jwks.len())
            .finish()
    }
}

impl Verifier {
    /// A verifier for an HMAC secret and/or a JWKS document (`{"keys":[...]}`
    /// or a single JWK). Empty strings count as not configured.
    pub fn new(secret: Option<&str>, jwks: Option<&str>) -> Result<Verifier, JwksError> {
        let secret = secret
            .filter(|s| !s.is_empty())
            .map(|s| DecodingKey::from_secret(s.as_bytes()));
        let jwks = match jwks.map(str::trim).filter(|s| !s.is_empty()) {
            None => Vec::new(),
            Some(text) => parse_jwks(text)?,
        };
        Ok(Verifier {
            secret,
            jwks,
            audience: None,
        })
    }

    /// Also requires `aud` to be (or, as an array, contain) `audience`;
    /// empty means no check.
    pub fn with_audience(mut self, audience: Option<&str>) -> Verifier {
        self.audience = audience.filter(|a| !a.is_empty()).map(str::to_owned);
        self
    }

    /// Whether any key is configured at all.
    pub fn has_keys(&self) -> bool {
        self.secret.is_some() || !self.jwks.is_empty()
    }

    /// Verifies `token` at time `now` (seconds since the epoch).
    pub fn verify(&self, token: &str, now: i64) -> Result<Claims, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let alg = header_alg(token)?;
        let key = self.key_for(token, alg)?;
        let mut validation = Validation::new(alg);
        // Claims are checked below, with the protocol's own messages.
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_aud = false;
        let data = jsonwebtoken::decode::<Box<serde_json::value::RawValue>>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm | ErrorKind::InvalidKeyFormat => {
                    AuthError::BadSignature
                }
                _ => AuthError::Malformed,
            }
        })?;
        let json = data.claims.get().to_owned();
        let all: Map<String, Value> = serde_json::from_str(&json).map_err(|_| AuthError::Malformed)?;
        let claims = claims(all, json, now)?;
        if let Some(audience) = &self.audience {
            let aud = claims.all.get("aud");
            let matches = match aud {
                Some(Value::String(a)) => a == audience,
                Some(Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(audience)),
                _ => false,
            };
            if !matches {
                return Err(AuthError::WrongAudience);
            }
        }
        Ok(claims)
    }

    fn key_for(&self, token: &str, alg: Algorithm) -> Result<DecodingKey, AuthError> {
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Malformed)?
            .kid;
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        let from_jwks = |want_oct: bool| {
            self.jwks
                .iter()
                .filter(|(id, _)| kid.is_none() || id == &kid)
                .filter(|(_, jwk)| matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) == want_oct)
                .filter(|(_, jwk)| family_matches(jwk, alg))
                .find_map(|(_, jwk)| DecodingKey::from_jwk(jwk).ok())
        };
        let key = if hmac {
            match (&kid, &self.secret) {
                // A kid names a JWKS key; fall back to the secret.
                (Some(_), secret) => from_jwks(true).or_else(|| secret.clone()),
                (None, Some(secret)) => Some(secret.clone()),
                (None, None) => from_jwks(true),
            }
        } else {
            from_jwks(false)
        };
        key.ok_or(AuthError::NoSigner)
    }
}

fn family_matches(jwk: &Jwk, alg: Algorithm) -> bool {
    use Algorithm::*;
    match &jwk.algorithm {
        AlgorithmParameters::OctetKey(_) => matches!(alg, HS256 | HS384 | HS512),
        AlgorithmParameters::RSA(_) => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
        AlgorithmParameters::EllipticCurve(_) => matches!(alg, ES256 | ES384),
        AlgorithmParameters::OctetKeyPair(_) => matches!(alg, EdDSA),
    }
}

fn parse_jwks(text: &str) -> Result<Vec<(Option<String>, Jwk)>, JwksError> {
    let value: Value = serde_json::from_str(text).map_err(|e| JwksError(e.to_string()))?;
    let keys: Vec<Jwk> = if value.get("keys").is_some() {
        serde_json::from_value::<JwkSet>(value)
            .map_err(|e| JwksError(e.to_string()))?
            .keys
    } else {
        vec![serde_json::from_value::<Jwk>(value).map_err(|e| JwksError(e.to_string()))?]
    };
    Ok(keys.into_iter().map(|k| (k.common.key_id.clone(), k)).collect())
}

/// Reads `alg` from the header ourselves, so that `none` (which the JWT
/// library cannot even represent) is reported as a signature failure rather
/// than as garbage.
fn header_alg(token: &str) -> Result<Algorithm, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::Malformed);
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .map_err(|_| AuthError::Malformed)?;
    let header: Map<String, Value> = serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    match header.get("alg").and_then(Value::as_str) {
        None => Err(AuthError::Malformed),
        Some(alg) if alg.eq_ignore_ascii_case("none") => Err(AuthError::BadSignature),
        Some(alg) => alg.parse::<Algorithm>().map_err(|_| AuthError::BadSignature),
    }
}

fn claims(all: Map<String, Value>, json: String, now: i64) -> Result<Claims, AuthError> {
    let role = all.get("role").and_then(Value::as_str).filter(|r| !r.is_empty());
    let (Some(role), Some(exp)) = (role, all.get("exp")) else {
        return Err(AuthError::MissingClaims);
    };
    // Decimal exp/iat are rounded, as Supabase does.
    let numeric = |v: &Value| {
        v.as_i64()
            .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f.round() as i64))
    };
    let exp = numeric(exp).ok_or(AuthError::BadExpiry)?;
    if let Some(iat) = all.get("iat") {
        numeric(iat).ok_or(AuthError::Malformed)?;
    }
    if let Some(nbf) = all.get("nbf") {
        let nbf = numeric(nbf).ok_or(AuthError::Malformed)?;
        if nbf > now {
            return Err(AuthError::NotYetValid(nbf - now));
        }
    }
    if exp <= now {
        return Err(AuthError::Expired(now - exp));
    }
    Ok(Claims {
        role: role.to_owned(),
        exp,
        sub: all.get("sub").and_then(Value::as_str).map(str::to_owned),
        all,
        json,
    })
}

/// Seconds since the epoch.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    pub const SECRET: &str = "super-secret-jwt-token-with-at-least-32-characters";
    const NOW: i64 = 1_800_000_000;

    pub fn hs256(secret: &str, claims: Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn b64(v: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    fn verifier() -> Verifier {
        Verifier::new(Some(SECRET), None).unwrap()
    }

    #[test]
    fn valid_token() {
        let t = hs256(
            SECRET,
            json!({"role": "authenticated", "exp": NOW + 60, "sub": "u1", "email": "a@b"}),
        );
        let c = verifier().verify(&t, NOW).unwrap();
        assert_eq!(c.role, "authenticated");
        assert_eq!(c.exp, NOW + 60);
        assert_eq!(c.sub.as_deref(), Some("u1"));
        assert_eq!(c.all["email"], "a@b");
    }

    #[test]
    fn hs384_and_hs512() {
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let t = encode(
                &Header::new(alg),
                &json!({"role": "anon", "exp": NOW + 1}),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap();
            assert!(verifier().verify(&t, NOW).is_ok(), "{alg:?}");
        }
    }

    #[test]
    fn claims_keep_their_text() {
        let t = hs256(SECRET, json!({"role": "anon", "exp": NOW + 60}));
        let text = verifier().verify(&t, NOW).unwrap().json;
        assert_eq!(
            serde_json::from_str::<Value>(&text).unwrap(),
            json!({"role": "anon", "exp": NOW + 60})
        );
    }

    #[test]
    fn not_before_and_audience() {
        let early = hs256(SECRET, json!({"role": "anon", "exp": NOW + 60, "nbf": NOW + 30}));
        assert_eq!(verifier().verify(&early, NOW), Err(AuthError::NotYetValid(30)));
        assert!(verifier().verify(&early, NOW + 30).is_ok());
        let bad_nbf = hs256(SECRET, json!({"role": "anon", "exp": NOW + 60, "nbf": "soon"}));
        assert_eq!(verifier().verify(&bad_nbf, NOW), Err(AuthError::Malformed));
        let with_aud = |aud: Value| hs256(SECRET, json!({"role": "anon", "exp": NOW + 60, "aud": aud}));
        let strict = || verifier().with_audience(Some("authenticated"));
        assert!(strict().verify(&with_aud(json!("authenticated")), NOW).is_ok());
        assert!(strict().verify(&with_aud(json!(["x", "authenticated"])), NOW).is_ok());
        assert_eq!(
            strict().verify(&with_aud(json!("other")), NOW),
            Err(AuthError::WrongAudience)
        );
        let none = hs256(SECRET, json!({"role": "anon", "exp": NOW + 60}));
        assert_eq!(strict().verify(&none, NOW), Err(AuthError::WrongAudience));
        // without the setting, aud is not looked at
        assert!(verifier().verify(&with_aud(json!("other")), NOW).is_ok());
        assert!(verifier().with_audience(Some("")).verify(&none, NOW).is_ok());
    }

    #[test]
    fn expired_token() {
        let t = hs256(SECRET, json!({"role": "anon", "exp": NOW - 5}));
        assert_eq!(verifier().verify(&t, NOW), Err(AuthError::Expired(5)));
        assert_eq!(
            AuthError::Expired(5).join_reason(),
            "InvalidJWTToken: Token has expired 5 seconds ago"
        );
        assert_eq!(AuthError::Expired(5).handshake_message(), "Token has expired");
        // exactly at exp is expired
        let t = hs256(SECRET, json!({"role": "anon", "exp": NOW}));
        assert_eq!(verifier().verify(&t, NOW), Err(AuthError::Expired(0)));
    }

    #[test]
    fn decimal_exp_is_rounded() {
        let t = hs256(SECRET, json!({"role": "anon", "exp": (NOW + 10) as f64 + 0.4}));
        assert_eq!(verifier().verify(&t, NOW).unwrap().exp, NOW + 10);
    }

    #[test]
    fn wrong_secret() {
        let t = hs256(
            "another-secret-another-secret-another-secret",
            json!({"role": "anon", "exp": NOW + 60}),
        );
        assert_eq!(verifier().verify(&t, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn tampered_payload() {
        let t = hs256(SECRET, json!({"role": "anon", "exp": NOW + 60}));
        let parts: Vec<&str> = t.split('.').collect();
        let forged = b64(json!({"role": "service_role", "exp": NOW + 60}).to_string().as_bytes());
        let t = format!("{}.{}.{}", parts[0], forged, parts[2]);
        assert_eq!(verifier().verify(&t, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn alg_none_is_refused() {
        for alg in ["none", "None", "NONE"] {
            let header = b64(json!({"alg": alg, "typ": "JWT"}).to_string().as_bytes());
            let body = b64(json!({"role": "service_role", "exp": NOW + 60}).to_string().as_bytes());
            for sig in ["", "x"] {
                let t = format!("{header}.{body}.{sig}");
                assert_eq!(verifier().verify(&t, NOW), Err(AuthError::BadSignature), "{t}");
            }
        }
    }

    #[test]
    fn missing_role_or_exp() {
        for claims in [
            json!({"exp": NOW + 60}),
            json!({"role": "anon"}),
            json!({"role": "", "exp": NOW + 60}),
            json!({"role": 5, "exp": NOW + 60}),
        ] {
            let t = hs256(SECRET, claims.clone());
            assert_eq!(verifier().verify(&t, NOW), Err(AuthError::MissingClaims), "{claims}");
        }
        assert_eq!(
            AuthError::MissingClaims.join_reason(),
            "InvalidJWTToken: Fields `role` and `exp` are required in JWT"
        );
    }

    #[test]
    fn non_numeric_exp_or_iat() {
        let t = hs256(SECRET, json!({"role": "anon", "exp": "tomorrow"}));
        assert_eq!(verifier().verify(&t, NOW), Err(AuthError::BadExpiry));
        let t = hs256(SECRET, json!({"role": "anon", "exp": NOW + 60, "iat": "now"}));
        assert_eq!(verifier().verify(&t, NOW), Err(AuthError::Malformed));
    }

    #[test]
    fn garbage_is_malformed() {
        for t in ["abc", "a.b", "a.b.c.d", "!!!.e30.x", "e30.e30.x"] {
            assert_eq!(verifier().verify(t, NOW), Err(AuthError::Malformed), "{t}");
        }
        assert_eq!(verifier().verify("  ", NOW), Err(AuthError::Missing));
        assert_eq!(
            AuthError::Malformed.join_reason(),
            "MalformedJWT: The token provided is not a valid JWT"
        );
    }

    #[test]
    fn no_secret_configured() {
        let t = hs256(SECRET, json!({"role": "anon", "exp": NOW + 60}));
        let v = Verifier::new(None, None).unwrap();
        assert!(!v.has_keys());
        assert_eq!(v.verify(&t, NOW), Err(AuthError::NoSigner));
        let v = Verifier::new(Some(""), Some("  ")).unwrap();
        assert_eq!(v.verify(&t, NOW), Err(AuthError::NoSigner));
    }

    // A fixed 2048-bit RSA test key (generated once for these tests; not used anywhere else).
    const RSA_PRIVATE_PEM: &str = include_str!("../../tests/keys/rsa_private.pem");
    const RSA_PUBLIC_PEM: &str = include_str!("../../tests/keys/rsa_public.pem");
    const RSA_JWKS: &str = include_str!("../../tests/keys/rsa_jwks.json");

    fn rs256(kid: Option<&str>, claims: Value) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = kid.map(Into::into);
        encode(
            &h,
            &claims,
            &EncodingKey::from_rsa_pem(RSA_PRIVATE_PEM.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn rs256_via_jwks() {
        let v = Verifier::new(None, Some(RSA_JWKS)).unwrap();
        let t = rs256(Some("test-rsa"), json!({"role": "authenticated", "exp": NOW + 60}));
        assert_eq!(v.verify(&t, NOW).unwrap().role, "authenticated");
        // unknown kid: no key to verify with
        let t = rs256(Some("other"), json!({"role": "authenticated", "exp": NOW + 60}));
        assert_eq!(v.verify(&t, NOW), Err(AuthError::NoSigner));
        // RS256 without a JWKS: no signer, even with a secret
        let t = rs256(Some("test-rsa"), json!({"role": "authenticated", "exp": NOW + 60}));
        assert_eq!(verifier().verify(&t, NOW), Err(AuthError::NoSigner));
    }

    /// The classic confusion attack: sign HS256 with the server's RSA
    /// public key as the HMAC secret.
    #[test]
    fn algorithm_confusion_is_refused() {
        let claims = json!({"role": "service_role", "exp": NOW + 60});
        for secret in [RSA_PUBLIC_PEM.as_bytes(), RSA_PUBLIC_PEM.trim().as_bytes()] {
            let mut h = Header::new(Algorithm::HS256);
            h.kid = Some("test-rsa".into());
            let t = encode(&h, &claims, &EncodingKey::from_secret(secret)).unwrap();
            let jwks_only = Verifier::new(None, Some(RSA_JWKS)).unwrap();
            assert_eq!(jwks_only.verify(&t, NOW), Err(AuthError::NoSigner));
            let both = Verifier::new(Some(SECRET), Some(RSA_JWKS)).unwrap();
            assert_eq!(both.verify(&t, NOW), Err(AuthError::BadSignature));
        }
    }

    #[test]
    fn oct_key_in_jwks_by_kid() {
        let oct = json!({"keys": [{"kty": "oct", "kid": "hs-1", "k": b64(b"jwks-hmac-secret-jwks-hmac-secret")}]})
            .to_string();
        let v = Verifier::new(None, Some(&oct)).unwrap();
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("hs-1".into());
        let t = encode(
            &h,
            &json!({"role": "anon", "exp": NOW + 60}),
            &EncodingKey::from_secret(b"jwks-hmac-secret-jwks-hmac-secret"),
        )
        .unwrap();
        assert!(v.verify(&t, NOW).is_ok());
    }

    #[test]
    fn bad_jwks_is_a_config_error() {
        assert!(Verifier::new(None, Some("{not json")).is_err());
        assert!(Verifier::new(None, Some(r#"{"keys": [{"kty": "nope"}]}"#)).is_err());
    }

    #[test]
    fn debug_never_prints_secrets() {
        let v = verifier();
        assert!(!format!("{v:?}").contains(SECRET));
        let t = hs256(
            SECRET,
            json!({"role": "anon", "exp": NOW + 60, "email": "private@example.test"}),
        );
        let c = v.verify(&t, NOW).unwrap();
        assert!(!format!("{c:?}").contains("private@"));
    }
}
