//! The custom resources of `matrix-operator.io/v1alpha1`: what users write.

mod accesstoken;
mod conditions;
mod homeserver;
mod matrixuser;

pub use accesstoken::{MatrixAccessToken, MatrixAccessTokenSpec, MatrixAccessTokenStatus, RetiringToken, UserRef};
pub use conditions::{
    READY, RECONCILING, Ready, STALLED, Standing, condition, is_true, ready_condition, set_condition,
};
pub use homeserver::{AccountCounts, Homeserver, HomeserverPolicy, HomeserverSpec, HomeserverStatus, MasSpec};
pub use matrixuser::{
    DeletionPolicy, ExternalIdSpec, HomeserverRef, ManagedRoom, ManagementPolicy, MatrixUser, MatrixUserSpec,
    MatrixUserStatus, PENDING_CREATION, PasswordSpec, PendingCreation, RoomName, SecretKeyRef, ThreepidMedium,
    ThreepidSpec, UserType,
};

/// The API group of every kind here.
pub const GROUP: &str = "matrix-operator.io";
/// The one version served so far.
pub const VERSION: &str = "v1alpha1";

/// Every CRD as one multi-document YAML stream, as `matrix-user-operator crd`
/// prints it and `crds/` stores it.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [Homeserver::crd(), MatrixUser::crd(), MatrixAccessToken::crd()] {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
