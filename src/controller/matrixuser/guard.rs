//! The MatrixUser side of the executor's [`WriteGuard`]: before the first
//! write to the homeserver the copy of the MatrixUser is checked against
//! the API server, before a create the pending creation is recorded, and
//! before an account is taken as the resource's own no other MatrixUser
//! may claim it. A stop comes back to the pass in the sync's error.

use super::*;

pub(super) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Why a sync stopped: the guard found the copy stale, or it failed.
#[derive(Debug)]
pub(super) enum Stop {
    /// The copy of the MatrixUser is older than the API server's: nothing
    /// was written.
    Stale(Box<MatrixUser>),
    Failed(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Self {
        Stop::Failed(e)
    }
}

impl From<crate::synapse::InvalidUserId> for Stop {
    fn from(e: crate::synapse::InvalidUserId) -> Self {
        Stop::Failed(e.into())
    }
}

impl From<SyncError<Stop>> for Stop {
    fn from(e: SyncError<Stop>) -> Self {
        match e {
            SyncError::Halted(stop) => stop,
            SyncError::Refused(r) => Stop::Failed(Error::Refused(r)),
            SyncError::Backend(e) => Stop::Failed(Error::Backend(e)),
            SyncError::Unsupported(message) => Stop::Failed(Error::InvalidSpec(message)),
            e @ SyncError::NotSettling { .. } => Stop::Failed(Error::NotSettling(e.to_string())),
        }
    }
}

/// The MatrixUser side of [`WriteGuard`]: before the first write to the
/// homeserver, the copy of the MatrixUser is checked against the API
/// server; before a create, the pending creation is recorded in status;
/// before an existing account is taken as the resource's own, no other
/// MatrixUser may own or be creating it.
pub(super) struct Guard<'a> {
    pub(super) ctx: &'a Context,
    pub(super) user: &'a MatrixUser,
    pub(super) api: Api<MatrixUser>,
    /// The status as last read or written, and the resourceVersion it has.
    pub(super) base: MatrixUserStatus,
    pub(super) resource_version: Option<String>,
    /// Known once the Homeserver is: the server part of the Matrix ID.
    pub(super) server_name: Option<String>,
    pub(super) confirmed: bool,
    pub(super) wrote_status: bool,
    /// Whether the copy as last written has the finalizer.
    pub(super) has_finalizer: bool,
    /// The pending-creation record as last written.
    pub(super) record: Option<PendingCreation>,
}

impl<'a> Guard<'a> {
    pub(super) fn new(ctx: &'a Context, user: &'a MatrixUser) -> Self {
        Self {
            ctx,
            user,
            api: Api::namespaced(ctx.client.clone(), &user.namespace().unwrap_or_default()),
            base: user.status.clone().unwrap_or_default(),
            resource_version: user.resource_version(),
            server_name: None,
            confirmed: false,
            wrote_status: false,
            has_finalizer: has_finalizer(user),
            record: user.pending_creation(),
        }
    }

    /// Writes the MatrixUser's metadata on the copy the sync is based on
    /// (a resourceVersion precondition): the finalizer where it is missing,
    /// and, when `record` is given, the pending-creation record (`None`:
    /// removed). One write, which also confirms the copy is current.
    pub(super) async fn write_metadata(&mut self, record: Option<Option<&PendingCreation>>) -> Result<(), kube::Error> {
        let mut meta = serde_json::json!({ "resourceVersion": self.resource_version });
        if !self.has_finalizer {
            let mut finalizers = self.user.finalizers().to_vec();
            finalizers.push(FINALIZER.to_string());
            meta["finalizers"] = serde_json::json!(finalizers);
        }
        if let Some(record) = record {
            let value = record
                .map(serde_json::to_string)
                .transpose()
                .map_err(kube::Error::SerdeError)?;
            let mut annotations = serde_json::Map::new();
            annotations.insert(PENDING_CREATION.to_string(), serde_json::json!(value));
            meta["annotations"] = serde_json::Value::Object(annotations);
        }
        let patch = serde_json::json!({ "metadata": meta });
        let written = self
            .api
            .patch(&self.user.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        self.resource_version = written.resource_version();
        self.has_finalizer = true;
        if let Some(record) = record {
            self.record = record.cloned();
        }
        Ok(())
    }

    /// Adds the finalizer where the pass wrote nothing that carried it:
    /// every MatrixUser a pass looked at goes through its deletion policy.
    pub(super) async fn ensure_finalizer(&mut self) -> Result<(), kube::Error> {
        if self.has_finalizer {
            return Ok(());
        }
        self.write_metadata(None).await
    }

    /// Drops a pending-creation record that the pass settled without an
    /// account of its own (a create refused outright), so that no later
    /// pass takes an account of that ID as one it made.
    pub(super) async fn drop_record(&mut self, user_id: &str) -> Result<(), kube::Error> {
        if self.record.as_ref().is_some_and(|r| r.user_id == user_id) {
            self.write_metadata(Some(None)).await?;
        }
        Ok(())
    }

    pub(super) async fn fetch(&self) -> Result<MatrixUser, kube::Error> {
        self.api.get(&self.user.name_any()).await
    }

    pub(super) fn rebase(&mut self, fresh: &MatrixUser) {
        self.base = fresh.status.clone().unwrap_or_default();
        self.resource_version = fresh.resource_version();
        self.has_finalizer = has_finalizer(fresh);
        self.record = fresh.pending_creation();
    }

    pub(super) async fn write(&mut self, status: &MatrixUserStatus) -> Result<(), kube::Error> {
        let written = patch_status_at(
            &self.api,
            &self.user.name_any(),
            status,
            self.resource_version.as_deref(),
        )
        .await?;
        self.base = status.clone();
        self.resource_version = written.resource_version();
        self.wrote_status = true;
        Ok(())
    }

    /// Whether the copy the sync is based on is still the API server's.
    pub(super) async fn confirm(&mut self) -> Result<(), Stop> {
        if self.confirmed {
            return Ok(());
        }
        if !self.has_finalizer {
            // Adding the finalizer at the resourceVersion read confirms it.
            return match self.write_metadata(None).await {
                Ok(()) => {
                    self.confirmed = true;
                    Ok(())
                }
                Err(e) => Err(self.stale_or_failed(e).await),
            };
        }
        match self.fetch().await {
            Ok(fresh) if fresh.resource_version() == self.resource_version => {
                self.confirmed = true;
                Ok(())
            }
            Ok(fresh) => Err(Stop::Stale(Box::new(fresh))),
            Err(e) => Err(Stop::Failed(e.into())),
        }
    }

    /// Stops the sync after a refused write: on a conflict, with the newer
    /// copy to start again on.
    pub(super) async fn stale_or_failed(&self, e: kube::Error) -> Stop {
        if is_conflict(&e) {
            match self.fetch().await {
                Ok(fresh) => Stop::Stale(Box::new(fresh)),
                Err(e) => Stop::Failed(e.into()),
            }
        } else {
            Stop::Failed(e.into())
        }
    }

    pub(super) async fn record_pending_creation(&mut self) -> Result<Option<plan::PendingCreation>, Stop> {
        let Some(user_id) = self.user_id() else {
            return Ok(None);
        };
        let now = k8s_openapi::jiff::Timestamp::now().as_second();
        // An earlier create of this ID that went unanswered may still have
        // made the account: the record covers it too.
        let earlier = self.record.as_ref().and_then(|p| p.of(user_id.as_str()));
        let pending = match earlier {
            Some(earlier) => plan::PendingCreation {
                last_requested_at: now,
                ..earlier
            },
            None => plan::PendingCreation::at(now),
        };
        let record = PendingCreation::record(user_id.as_str(), pending);
        match self.write_metadata(Some(Some(&record))).await {
            Ok(()) => {
                self.confirmed = true;
                Ok(Some(pending))
            }
            Err(e) => Err(self.stale_or_failed(e).await),
        }
    }

    pub(super) fn user_id(&self) -> Option<UserId> {
        let name = self.user.name_any();
        let server = self.server_name.as_deref()?;
        UserId::new(self.user.spec.effective_localpart(&name), server).ok()
    }
}

impl WriteGuard<Stop> for Guard<'_> {
    fn before_write(&mut self, write: Write) -> BoxFuture<'_, Result<Option<plan::PendingCreation>, Stop>> {
        Box::pin(async move {
            match write {
                Write::Update => self.confirm().await.map(|()| None),
                Write::Create => self.record_pending_creation().await,
                Write::Claim => {
                    self.confirm().await?;
                    let Some(user_id) = self.user_id() else {
                        return Ok(None);
                    };
                    ownership::other_claimant(self.ctx, self.user, &user_id).await?;
                    Ok(None)
                }
            }
        })
    }
}
