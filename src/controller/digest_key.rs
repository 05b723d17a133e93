//! The operator's key for password digests, kept in a Secret of the
//! operator's own namespace: made at the first start, read by every start
//! and replica after it.

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tracing::info;

use crate::secret::{DIGEST_KEY_LEN, DigestKey};

/// The Secret's name, in the operator's namespace.
pub const SECRET_NAME: &str = "matrix-user-operator-digest-key";
pub(super) const KEY: &str = "key";
/// The label the operator puts on the Secrets it makes.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", super::MANAGER);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read or create Secret {namespace}/{SECRET_NAME}: {source}")]
    Kube {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "Secret {namespace}/{SECRET_NAME} has no {DIGEST_KEY_LEN}-byte key {KEY:?}: delete it to have a new one made (every managed password is then sent once more)"
    )]
    Malformed { namespace: String },
}

/// The key in `namespace`, made (at random) if there is none yet. Two
/// replicas starting together agree: the one whose create loses reads the
/// winner's.
pub async fn load_or_create(client: Client, namespace: &str) -> Result<DigestKey, KeyError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let kube_error = |source| KeyError::Kube {
        namespace: namespace.to_string(),
        source,
    };
    for _ in 0..2 {
        if let Some(secret) = api.get_opt(SECRET_NAME).await.map_err(kube_error)? {
            return secret
                .data
                .as_ref()
                .and_then(|d| d.get(KEY))
                .and_then(|v| DigestKey::from_bytes(&v.0))
                .ok_or_else(|| KeyError::Malformed {
                    namespace: namespace.to_string(),
                });
        }
        let key = DigestKey::generate();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(SECRET_NAME.into()),
                namespace: Some(namespace.into()),
                labels: Some([(MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string())].into()),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some([(KEY.to_string(), ByteString(key.expose().to_vec()))].into()),
            ..Secret::default()
        };
        match api.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                info!(namespace, secret = SECRET_NAME, "made the key of the password digests");
                return Ok(key);
            }
            // Another replica made it first: read that one.
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(kube_error(e)),
        }
    }
    Err(KeyError::Malformed {
        namespace: namespace.to_string(),
    })
}
