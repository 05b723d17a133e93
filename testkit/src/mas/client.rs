//! What MAS test suites code against: [`MasTarget`] and small HTTP-only
//! helpers that work the same against a real MAS and the stand-in.

use serde_json::{Value, json};

use super::super::synapse::{http_client, parse_body};
use super::util::base64_encode;

/// What a MAS test suite needs: from the stand-in, or from the environment
/// for the opt-in suite against a real MAS.
///
/// `Debug` redacts the secrets (client secret, Synapse admin token).
#[derive(Clone)]
pub struct MasTarget {
    /// MAS base URL (admin API, /oauth2/token, compat /login), no trailing slash.
    pub mas_url: String,
    /// An admin client (`policy.data.admin_clients`).
    pub client_id: String,
    pub client_secret: String,
    /// The Synapse that delegates to this MAS.
    pub synapse_url: String,
    /// A token Synapse's admin API accepts (compatibility token).
    pub synapse_admin_token: String,
    pub server_name: String,
    /// An upstream OAuth provider configured in MAS.
    pub upstream_provider_id: String,
    /// Its `human_name`.
    pub upstream_provider_name: String,
    /// A password MAS's policy refuses.
    pub weak_password: String,
}

impl std::fmt::Debug for MasTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasTarget")
            .field("mas_url", &self.mas_url)
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .field("synapse_url", &self.synapse_url)
            .field("synapse_admin_token", &"<redacted>")
            .field("server_name", &self.server_name)
            .field("upstream_provider_id", &self.upstream_provider_id)
            .field("upstream_provider_name", &self.upstream_provider_name)
            .field("weak_password", &self.weak_password)
            .finish()
    }
}

/// A MAS user as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasUser {
    pub id: String,
    pub username: String,
    pub admin: bool,
    pub locked: bool,
    pub deactivated: bool,
}

impl MasUser {
    fn from_resource(resource: &Value) -> MasUser {
        let a = &resource["attributes"];
        MasUser {
            id: resource["id"].as_str().unwrap_or_default().to_owned(),
            username: a["username"].as_str().unwrap_or_default().to_owned(),
            admin: a["admin"].as_bool().unwrap_or_default(),
            locked: !a["locked_at"].is_null(),
            deactivated: !a["deactivated_at"].is_null(),
        }
    }
}

/// An upstream OAuth link as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MasLink {
    pub id: String,
    pub provider_id: String,
    pub subject: String,
    pub user_id: Option<String>,
    pub human_account_name: Option<String>,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("MAS_URL is set, so {name} must be set too"))
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Sends a request; `(status, body)` with the body parsed as JSON (empty →
/// `Null`, not JSON → `String`). Panics on transport errors without
/// printing tokens.
async fn send(request: reqwest::RequestBuilder, what: &str) -> (u16, Value) {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {}", e.without_url()));
    let status = response.status().as_u16();
    let text = response
        .text()
        .await
        .unwrap_or_else(|e| panic!("{what}: reading the body: {}", e.without_url()));
    (status, parse_body(&text))
}

impl MasTarget {
    /// From `MAS_URL`, `MAS_CLIENT_ID`, `MAS_CLIENT_SECRET`, `MAS_SYNAPSE_URL`,
    /// `MAS_SYNAPSE_ADMIN_TOKEN`, `MAS_SERVER_NAME`, `MAS_UPSTREAM_PROVIDER_ID`,
    /// `MAS_UPSTREAM_PROVIDER_NAME` (optional: `MAS_WEAK_PASSWORD`, default
    /// `"password"`); `None` when `MAS_URL` is unset. Panics naming the
    /// missing variable when `MAS_URL` is set and another is not.
    pub fn from_env() -> Option<MasTarget> {
        let mas_url = std::env::var("MAS_URL").ok().filter(|u| !u.is_empty())?;
        Some(MasTarget {
            mas_url: mas_url.trim_end_matches('/').to_owned(),
            client_id: env("MAS_CLIENT_ID"),
            client_secret: env("MAS_CLIENT_SECRET"),
            synapse_url: env("MAS_SYNAPSE_URL").trim_end_matches('/').to_owned(),
            synapse_admin_token: env("MAS_SYNAPSE_ADMIN_TOKEN"),
            server_name: env("MAS_SERVER_NAME"),
            upstream_provider_id: env("MAS_UPSTREAM_PROVIDER_ID"),
            upstream_provider_name: env("MAS_UPSTREAM_PROVIDER_NAME"),
            weak_password: std::env::var("MAS_WEAK_PASSWORD").unwrap_or_else(|_| "password".to_owned()),
        })
    }

    /// `@localpart:server_name`.
    pub fn user_id(&self, localpart: &str) -> String {
        format!("@{localpart}:{}", self.server_name)
    }

    /// `POST /oauth2/token` (`client_credentials`, `client_secret_basic`)
    /// with `scope`: `(status, body)`.
    pub async fn token_request(&self, client_id: &str, client_secret: &str, scope: &str) -> (u16, Value) {
        let basic = base64_encode(format!("{}:{}", urlencode(client_id), urlencode(client_secret)).as_bytes());
        let body = format!("grant_type=client_credentials&scope={}", urlencode(scope));
        let request = http_client()
            .post(format!("{}/oauth2/token", self.mas_url))
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        send(request, "POST /oauth2/token").await
    }

    /// A fresh `urn:mas:admin` token for the admin client. Panics (without
    /// the secret) unless MAS answers 200.
    pub async fn admin_token(&self) -> String {
        let (status, body) = self
            .token_request(&self.client_id, &self.client_secret, "urn:mas:admin")
            .await;
        match (status, body["access_token"].as_str()) {
            (200, Some(token)) => token.to_owned(),
            _ => panic!(
                "POST /oauth2/token for client {}: {status} {}",
                self.client_id, body["error"]
            ),
        }
    }

    /// An admin-API client holding a fresh admin token.
    pub async fn admin(&self) -> MasAdminClient {
        MasAdminClient {
            mas_url: self.mas_url.clone(),
            token: self.admin_token().await,
        }
    }

    /// `GET /api/admin/v1/users/by-username/{username}` (fresh token).
    pub async fn get_user_by_username(&self, username: &str) -> Option<MasUser> {
        self.admin().await.get_user_by_username(username).await
    }

    /// The email addresses MAS has for `user_id` (a ULID).
    pub async fn user_emails(&self, user_id: &str) -> Vec<String> {
        self.admin().await.user_emails(user_id).await
    }

    /// The upstream OAuth links MAS has for `user_id`.
    pub async fn upstream_links(&self, user_id: &str) -> Vec<MasLink> {
        self.admin().await.upstream_links(user_id).await
    }

    /// Creates `username` in MAS (and so in Synapse) behind the operator's
    /// back, for adoption tests.
    pub async fn create_user_directly(&self, username: &str) -> MasUser {
        self.admin().await.create_user(username).await
    }

    /// Password login through MAS's compatibility layer at `mas_url`:
    /// `Ok(access_token)` on 200, else `Err((status, errcode))`.
    pub async fn login(&self, localpart: &str, password: &str) -> Result<String, (u16, String)> {
        let body = json!({
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": password,
            "initial_device_display_name": "mas test harness",
        });
        let request = http_client()
            .post(format!("{}/_matrix/client/v3/login", self.mas_url))
            .json(&body);
        let (status, body) = send(request, "POST /_matrix/client/v3/login").await;
        match (status, body["access_token"].as_str()) {
            (200, Some(token)) => Ok(token.to_owned()),
            _ => Err((status, body["errcode"].as_str().unwrap_or_default().to_owned())),
        }
    }

    /// Any request to Synapse, optionally with a bearer token and JSON body.
    pub async fn synapse_request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = http_client().request(method.clone(), format!("{}{path}", self.synapse_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        send(request, &format!("{method} {path} on Synapse")).await
    }

    /// `GET` on Synapse with the Synapse admin token.
    pub async fn synapse_admin_get(&self, path: &str) -> (u16, Value) {
        self.synapse_request(reqwest::Method::GET, path, Some(&self.synapse_admin_token), None)
            .await
    }

    /// `PUT` on Synapse with the Synapse admin token.
    pub async fn synapse_admin_put(&self, path: &str, body: Value) -> (u16, Value) {
        self.synapse_request(reqwest::Method::PUT, path, Some(&self.synapse_admin_token), Some(body))
            .await
    }

    /// Synapse's admin view of `@localpart:server`: `GET /_synapse/admin/v2/users/…`.
    pub async fn synapse_user(&self, localpart: &str) -> (u16, Value) {
        self.synapse_admin_get(&format!(
            "/_synapse/admin/v2/users/{}",
            urlencode(&self.user_id(localpart))
        ))
        .await
    }

    /// Status of Synapse's `whoami` with `token`.
    pub async fn synapse_whoami_status(&self, token: &str) -> u16 {
        self.synapse_request(
            reqwest::Method::GET,
            "/_matrix/client/v3/account/whoami",
            Some(token),
            None,
        )
        .await
        .0
    }
}

/// The admin API with one admin token.
#[derive(Clone)]
pub struct MasAdminClient {
    pub mas_url: String,
    pub token: String,
}

impl std::fmt::Debug for MasAdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasAdminClient")
            .field("mas_url", &self.mas_url)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl MasAdminClient {
    /// Any admin-API request; `path` starts with `/api/admin/v1/`.
    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = http_client()
            .request(method.clone(), format!("{}{path}", self.mas_url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        send(request, &format!("{method} {path}")).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        self.request(reqwest::Method::DELETE, path, None).await
    }

    pub async fn get_user_by_username(&self, username: &str) -> Option<MasUser> {
        let (status, body) = self
            .get(&format!("/api/admin/v1/users/by-username/{}", urlencode(username)))
            .await;
        match status {
            200 => Some(MasUser::from_resource(&body["data"])),
            404 => None,
            _ => panic!("GET user by username {username:?}: {status} {body}"),
        }
    }

    pub async fn get_user(&self, id: &str) -> Option<MasUser> {
        let (status, body) = self.get(&format!("/api/admin/v1/users/{id}")).await;
        match status {
            200 => Some(MasUser::from_resource(&body["data"])),
            404 => None,
            _ => panic!("GET user {id}: {status} {body}"),
        }
    }

    /// `POST /api/admin/v1/users`; panics unless 201.
    pub async fn create_user(&self, username: &str) -> MasUser {
        let (status, body) = self.post("/api/admin/v1/users", json!({"username": username})).await;
        assert_eq!(status, 201, "POST /api/admin/v1/users {username:?}: {body}");
        MasUser::from_resource(&body["data"])
    }

    /// Every item of a paginated list, following `links.next`.
    pub async fn list_all(&self, path_and_query: &str) -> Vec<Value> {
        let mut items = Vec::new();
        let mut next = Some(path_and_query.to_owned());
        while let Some(path) = next.take() {
            let (status, body) = self.get(&path).await;
            assert_eq!(status, 200, "GET {path}: {body}");
            items.extend(body["data"].as_array().cloned().unwrap_or_default());
            next = body["links"]["next"].as_str().map(str::to_owned);
        }
        items
    }

    pub async fn user_emails(&self, user_id: &str) -> Vec<String> {
        self.list_all(&format!("/api/admin/v1/user-emails?filter[user]={user_id}"))
            .await
            .iter()
            .map(|e| e["attributes"]["email"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// `POST /api/admin/v1/user-emails`: `(status, body)`.
    pub async fn add_email(&self, user_id: &str, email: &str) -> (u16, Value) {
        self.post("/api/admin/v1/user-emails", json!({"user_id": user_id, "email": email}))
            .await
    }

    pub async fn upstream_links(&self, user_id: &str) -> Vec<MasLink> {
        self.list_all(&format!("/api/admin/v1/upstream-oauth-links?filter[user]={user_id}"))
            .await
            .iter()
            .map(|l| {
                let a = &l["attributes"];
                MasLink {
                    id: l["id"].as_str().unwrap_or_default().to_owned(),
                    provider_id: a["provider_id"].as_str().unwrap_or_default().to_owned(),
                    subject: a["subject"].as_str().unwrap_or_default().to_owned(),
                    user_id: a["user_id"].as_str().map(str::to_owned),
                    human_account_name: a["human_account_name"].as_str().map(str::to_owned),
                }
            })
            .collect()
    }

    /// `POST /api/admin/v1/upstream-oauth-links`: `(status, body)`.
    pub async fn add_upstream_link(&self, user_id: &str, provider_id: &str, subject: &str) -> (u16, Value) {
        self.post(
            "/api/admin/v1/upstream-oauth-links",
            json!({"user_id": user_id, "provider_id": provider_id, "subject": subject}),
        )
        .await
    }

    /// `POST /api/admin/v1/users/{id}/{action}` with `body` (`Null` sends none).
    pub async fn user_action(&self, user_id: &str, action: &str, body: Value) -> (u16, Value) {
        let body = (!body.is_null()).then_some(body);
        self.request(
            reqwest::Method::POST,
            &format!("/api/admin/v1/users/{user_id}/{action}"),
            body,
        )
        .await
    }

    /// `set-password`; `(status, body)`.
    pub async fn set_password(&self, user_id: &str, password: &str) -> (u16, Value) {
        self.user_action(user_id, "set-password", json!({"password": password}))
            .await
    }
}
