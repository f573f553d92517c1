//! OpenID Connect sign-in: discovery, the authorization code flow with PKCE (the `oauth2`
//! crate), and ID-token validation (signature against the provider's JWKS, issuer,
//! audience, expiry, nonce).

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthUrl, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken, EndpointNotSet,
    EndpointSet, ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    StandardRevocableToken, StandardTokenResponse, TokenUrl,
};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

use crate::configuration::OidcSettings;

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct IdTokenField {
    #[serde(default)]
    pub id_token: Option<String>,
}
impl ExtraTokenFields for IdTokenField {}

type TokenResponse = StandardTokenResponse<IdTokenField, BasicTokenType>;
type OAuthClient = Client<
    BasicErrorResponse,
    TokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("OpenID discovery at {url} failed: {reason}")]
    Discovery { url: String, reason: String },
    #[error("the provider refused the authorization code: {0}")]
    Exchange(String),
    #[error("the provider's answer had no ID token")]
    NoIdToken,
    #[error("the ID token is invalid: {0}")]
    InvalidToken(String),
}

/// The claims Consilium reads from an ID token.
#[derive(Debug, Clone, Deserialize)]
pub struct IdClaims {
    pub sub: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// What the browser is sent to, and what must be kept until it comes back.
pub struct AuthorizationStart {
    pub url: String,
    pub state: String,
    pub pkce_verifier: String,
    pub nonce: String,
}

pub struct OidcClient {
    pub settings: OidcSettings,
    issuer: String,
    jwks_uri: String,
    jwks: RwLock<JwkSet>,
    oauth: OAuthClient,
    http: reqwest::Client,
}

const ALLOWED_ALGS: [Algorithm; 6] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

impl OidcClient {
    /// Reads the provider's discovery document and keys.
    pub async fn discover(settings: OidcSettings) -> Result<Self, OidcError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(15))
            .build()
            .map_err(|e| OidcError::Discovery {
                url: settings.issuer_url.clone(),
                reason: e.to_string(),
            })?;
        let url = format!(
            "{}/.well-known/openid-configuration",
            settings.issuer_url.trim_end_matches('/')
        );
        let fail = |reason: String| OidcError::Discovery {
            url: url.clone(),
            reason,
        };
        let discovery: Discovery = http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| fail(e.to_string()))?
            .json()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if discovery.issuer.trim_end_matches('/') != settings.issuer_url.trim_end_matches('/') {
            return Err(fail(format!(
                "the provider calls itself {:?}, not the configured issuer",
                discovery.issuer
            )));
        }
        let oauth = Client::new(ClientId::new(settings.client_id.clone()))
            .set_client_secret(ClientSecret::new(
                settings.client_secret.expose_secret().to_string(),
            ))
            .set_auth_uri(
                AuthUrl::new(discovery.authorization_endpoint.clone())
                    .map_err(|e| fail(e.to_string()))?,
            )
            .set_token_uri(
                TokenUrl::new(discovery.token_endpoint.clone()).map_err(|e| fail(e.to_string()))?,
            )
            .set_redirect_uri(
                RedirectUrl::new(settings.redirect_url.clone()).map_err(|e| fail(e.to_string()))?,
            );
        let jwks = fetch_jwks(&http, &discovery.jwks_uri).await.map_err(fail)?;
        Ok(OidcClient {
            settings,
            issuer: discovery.issuer,
            jwks_uri: discovery.jwks_uri,
            jwks: RwLock::new(jwks),
            oauth,
            http,
        })
    }

    pub fn start(&self) -> AuthorizationStart {
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let nonce = super::random_secret(24);
        let mut request = self
            .oauth
            .authorize_url(CsrfToken::new_random)
            .set_pkce_challenge(challenge);
        for scope in &self.settings.scopes {
            request = request.add_scope(Scope::new(scope.clone()));
        }
        let (url, state) = request.add_extra_param("nonce", nonce.clone()).url();
        AuthorizationStart {
            url: url.to_string(),
            state: state.secret().clone(),
            pkce_verifier: verifier.secret().clone(),
            nonce,
        }
    }

    /// Exchanges the code (with the PKCE verifier) and validates the ID token.
    pub async fn finish(
        &self,
        code: String,
        pkce_verifier: String,
        nonce: &str,
    ) -> Result<IdClaims, OidcError> {
        let response = self
            .oauth
            .exchange_code(AuthorizationCode::new(code))
            .set_pkce_verifier(PkceCodeVerifier::new(pkce_verifier))
            .request_async(&self.http)
            .await
            .map_err(|e| OidcError::Exchange(e.to_string()))?;
        let id_token = response
            .extra_fields()
            .id_token
            .clone()
            .ok_or(OidcError::NoIdToken)?;
        self.validate(&id_token, nonce).await
    }

    /// Validates an ID token: a signature by one of the provider's keys (asymmetric
    /// algorithms only), the issuer, this client as audience, expiry, and the nonce.
    pub async fn validate(&self, token: &str, expected_nonce: &str) -> Result<IdClaims, OidcError> {
        let invalid = |s: String| OidcError::InvalidToken(s);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| invalid(format!("unreadable header: {e}")))?;
        if !ALLOWED_ALGS.contains(&header.alg) {
            return Err(invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let key = match self.key_for(header.kid.as_deref()).await {
            Some(k) => k,
            None => {
                // The provider may have rotated its keys: read them again once.
                if let Ok(fresh) = fetch_jwks(&self.http, &self.jwks_uri).await {
                    *self.jwks.write().await = fresh;
                }
                self.key_for(header.kid.as_deref()).await.ok_or_else(|| {
                    invalid("signed with a key the provider does not publish".into())
                })?
            }
        };
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[self.issuer.as_str()]);
        validation.set_audience(&[self.settings.client_id.as_str()]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = 30;
        let data = jsonwebtoken::decode::<IdClaims>(token, &key, &validation)
            .map_err(|e| invalid(e.to_string()))?;
        if data.claims.nonce.as_deref() != Some(expected_nonce) {
            return Err(invalid("its nonce does not match this sign-in".into()));
        }
        Ok(data.claims)
    }

    async fn key_for(&self, kid: Option<&str>) -> Option<DecodingKey> {
        let jwks = self.jwks.read().await;
        let jwk = match kid {
            Some(kid) => jwks.find(kid),
            None => jwks.keys.first(),
        }?;
        DecodingKey::from_jwk(jwk).ok()
    }
}

async fn fetch_jwks(http: &reqwest::Client, uri: &str) -> Result<JwkSet, String> {
    http.get(uri)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("reading the provider's keys at {uri}: {e}"))?
        .json::<JwkSet>()
        .await
        .map_err(|e| format!("the provider's keys at {uri} are unreadable: {e}"))
}
