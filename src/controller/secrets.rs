//! Reading referenced Secrets and keeping the generated credentials Secret.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::{Api, Client, Resource, ResourceExt};

use super::Error;
use crate::api::{MatrixUser, SecretKeyRef};
use crate::secret::{SecretString, generate_password};

/// Length of generated passwords: 32 characters of a 57-letter alphabet,
/// about 186 bits.
const GENERATED_PASSWORD_LEN: usize = 32;

/// The value of one key of a Secret in `namespace`, read from the API
/// server, and the resourceVersion of the copy it came from.
pub async fn read_key_at(
    client: &Client,
    namespace: &str,
    r: &SecretKeyRef,
) -> Result<(SecretString, Option<String>), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api.get_opt(&r.name).await?.ok_or_else(|| Error::SecretNotFound {
        name: r.name.clone(),
        key: r.key.clone(),
    })?;
    let value = value_of(&secret, &r.key).ok_or_else(|| Error::SecretKeyMissing {
        name: r.name.clone(),
        key: r.key.clone(),
    })?;
    Ok((value, secret.resource_version()))
}

fn value_of(secret: &Secret, key: &str) -> Option<SecretString> {
    if let Some(ByteString(bytes)) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(bytes.clone()).ok().map(SecretString::new);
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|s| SecretString::new(s.clone()))
}

/// Put on a Homeserver's admin token Secret while the Homeserver uses it.
pub const ADMIN_TOKEN_FINALIZER: &str = "matrix-operator.io/admin-token";

/// Puts [`ADMIN_TOKEN_FINALIZER`] on the Secret `name`, if it exists, is
/// not being deleted, and lacks it.
pub async fn hold(client: &Client, namespace: &str, name: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = api.get_metadata_opt(name).await? else {
        return Ok(());
    };
    if secret.meta().deletion_timestamp.is_some() || secret.finalizers().iter().any(|f| f == ADMIN_TOKEN_FINALIZER) {
        return Ok(());
    }
    let mut finalizers = secret.finalizers().to_vec();
    finalizers.push(ADMIN_TOKEN_FINALIZER.to_string());
    set_finalizers(&api, &secret, finalizers).await
}

/// Takes [`ADMIN_TOKEN_FINALIZER`] off the Secret `name`, if it has it.
pub async fn release(client: &Client, namespace: &str, name: &str) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(secret) = api.get_metadata_opt(name).await? else {
        return Ok(());
    };
    if !secret.finalizers().iter().any(|f| f == ADMIN_TOKEN_FINALIZER) {
        return Ok(());
    }
    let finalizers = secret
        .finalizers()
        .iter()
        .filter(|f| *f != ADMIN_TOKEN_FINALIZER)
        .cloned()
        .collect();
    set_finalizers(&api, &secret, finalizers).await
}

/// A merge patch of the finalizers on the copy that was read: others'
/// finalizers added meanwhile are never dropped (409, tried again later).
async fn set_finalizers(
    api: &Api<Secret>,
    secret: &PartialObjectMeta<Secret>,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "metadata": {"finalizers": finalizers, "resourceVersion": secret.resource_version()}
    });
    let params = PatchParams {
        field_manager: Some(super::MANAGER.into()),
        ..Default::default()
    };
    api.patch_metadata(&secret.name_any(), &params, &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The label on every Secret the operator creates.
pub const GENERATED_LABEL: (&str, &str) = ("app.kubernetes.io/managed-by", super::MANAGER);

/// The name of the Secret `password.generate` keeps.
pub fn credentials_secret_name(user: &MatrixUser) -> String {
    format!("{}-credentials", user.name_any())
}

/// The password in the generated credentials Secret, creating the Secret
/// (owned by the MatrixUser) when it does not exist. A Secret of that name
/// that the MatrixUser does not own is never touched. Also says whether it
/// was created, and the resourceVersion of the copy read or created.
pub async fn generated_password(
    client: &Client,
    user: &MatrixUser,
    user_id: &str,
    homeserver_url: &str,
) -> Result<(SecretString, bool, Option<String>), Error> {
    let ns = user.namespace().unwrap_or_default();
    let name = credentials_secret_name(user);
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    for _ in 0..2 {
        if let Some(existing) = api.get_opt(&name).await? {
            let owned = user
                .uid()
                .is_some_and(|uid| existing.owner_references().iter().any(|o| o.uid == uid));
            if !owned {
                return Err(Error::CredentialsSecretNotOwned { name });
            }
            let password = value_of(&existing, "password").ok_or_else(|| Error::SecretKeyMissing {
                name: name.clone(),
                key: "password".into(),
            })?;
            return Ok((password, false, existing.resource_version()));
        }
        let password = generate_password(GENERATED_PASSWORD_LEN)
            .map_err(|_| Error::InvalidSpec("the system has no randomness to generate a password".into()))?;
        let owner = user
            .controller_owner_ref(&())
            .ok_or_else(|| Error::InvalidSpec("the MatrixUser has no uid".into()))?;
        let data: BTreeMap<String, ByteString> = [
            (
                "username",
                user_id.trim_start_matches('@').split(':').next().unwrap_or_default(),
            ),
            ("password", password.expose()),
            ("userId", user_id),
            ("homeserverUrl", homeserver_url),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
        let mut secret = Secret {
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Secret::default()
        };
        secret.metadata.name = Some(name.clone());
        secret.metadata.namespace = Some(ns.clone());
        secret.metadata.owner_references = Some(vec![owner]);
        // The operator's mark, which deploy/'s ValidatingAdmissionPolicy
        // asks of every Secret the operator creates. No label carries the
        // MatrixUser's name: a label value holds 63 characters, a name 253
        // (the owner reference names it).
        secret.metadata.labels = Some(BTreeMap::from([(
            GENERATED_LABEL.0.to_string(),
            GENERATED_LABEL.1.to_string(),
        )]));
        match api
            .create(
                &PostParams {
                    field_manager: Some(super::MANAGER.into()),
                    ..Default::default()
                },
                &secret,
            )
            .await
        {
            Ok(created) => return Ok((password, true, created.resource_version())),
            // Made meanwhile (by us in another pass, or by someone else):
            // read it again and check who owns it.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::CredentialsSecretNotOwned { name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_wins_over_string_data_and_missing_keys_are_none() {
        let s = Secret {
            data: Some(BTreeMap::from([("k".to_string(), ByteString(b"from-data".to_vec()))])),
            string_data: Some(BTreeMap::from([
                ("k".to_string(), "from-string".to_string()),
                ("o".into(), "x".into()),
            ])),
            ..Secret::default()
        };
        assert_eq!(value_of(&s, "k").unwrap().expose(), "from-data");
        assert_eq!(value_of(&s, "o").unwrap().expose(), "x");
        assert!(value_of(&s, "missing").is_none());
    }
}
