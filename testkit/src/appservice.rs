//! An application service (a bridge) registered with a test Synapse: its
//! registration file goes into Synapse's `app_service_config_files` (pass
//! [`Appservice::config_override`] to `start_synapse_process`), and its
//! token registers users in its namespace, as a real bridge does.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

pub struct Appservice {
    pub id: String,
    pub as_token: String,
    pub path: PathBuf,
}

impl Appservice {
    /// Writes the registration of an appservice `id` that owns the user IDs
    /// `@<prefix>…:<server_name>` into `dir`. It has no URL: Synapse sends
    /// it nothing.
    pub fn write(dir: &Path, id: &str, prefix: &str, server_name: &str) -> Self {
        let as_token = format!("as-{id}-{}", std::process::id());
        let registration = json!({
            "id": id,
            "url": null,
            "as_token": as_token,
            "hs_token": format!("hs-{id}-{}", std::process::id()),
            "sender_localpart": format!("{prefix}bot"),
            "rate_limited": false,
            "namespaces": {
                "users": [{"exclusive": true, "regex": format!("@{}.*:{}", regex_escape(prefix), regex_escape(server_name))}],
                "aliases": [],
                "rooms": [],
            },
        });
        std::fs::create_dir_all(dir).expect("create the appservice directory");
        let path = dir.join(format!("{id}.yaml"));
        std::fs::write(&path, serde_yaml::to_string(&registration).unwrap()).expect("write the registration");
        Self {
            id: id.to_string(),
            as_token,
            path,
        }
    }

    /// The Synapse config that loads this registration.
    pub fn config_override(&self) -> Value {
        json!({ "app_service_config_files": [self.path] })
    }

    /// Registers `localpart` as the appservice does (`m.login.application_service`).
    pub async fn register_user(&self, base_url: &str, localpart: &str) -> (u16, Value) {
        let response = super::synapse::http_client()
            .post(format!("{base_url}/_matrix/client/v3/register"))
            .bearer_auth(&self.as_token)
            .json(&json!({"type": "m.login.application_service", "username": localpart, "inhibit_login": true}))
            .send()
            .await
            .expect("register through the appservice");
        let status = response.status().as_u16();
        (
            status,
            super::synapse::parse_body(&response.text().await.unwrap_or_default()),
        )
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let special = ".+*?()[]{}|^$\\".contains(c);
            special.then_some('\\').into_iter().chain(std::iter::once(c))
        })
        .collect()
}
