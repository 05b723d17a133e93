//! Leader election on a coordination.k8s.io Lease, so that of several
//! replicas exactly one reconciles (and so writes) at a time.
//!
//! Expiry is judged by the local clock from when this replica last saw the
//! Lease change, as client-go does, so clock skew between nodes does not
//! matter.

use std::future::Future;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::sync::Mutex;
use tracing::{info, warn};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name in the Lease (the pod name).
    pub identity: String,
    /// A holder that has not renewed for this long has lost the lease.
    pub lease_duration: Duration,
    /// How often the holder renews, and a standby retries.
    pub renew_every: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: "matrix-user-operator".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("lost the lease {0}: another replica may lead now")]
    Lost(String),
    #[error("shut down while standing by")]
    ShutDown,
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    /// The Lease's resourceVersion when last seen, and when it was first seen so.
    observed: Mutex<Option<(String, Instant)>>,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: Mutex::new(None),
        }
    }

    /// One attempt to take or keep the lease. `Ok(true)`: this replica holds it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let duration_secs = self.config.lease_duration.as_secs().max(1) as i32;
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.config.identity.as_str());
        if !mine && holder.is_some() && !self.expired(&lease, &spec).await {
            return Ok(false);
        }
        let mut renewed = lease.clone();
        renewed.spec = Some(LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: Some(duration_secs),
            acquire_time: if mine {
                spec.acquire_time.clone()
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(spec.lease_transitions.unwrap_or(0) + i32::from(!mine)),
            ..spec
        });
        // The resourceVersion in `renewed` makes this a compare-and-swap:
        // of two replicas taking an expired lease, one gets 409.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &renewed)
            .await
        {
            Ok(_) => {
                if !mine {
                    info!(identity = %self.config.identity, "acquired the lease");
                }
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whether the holder has not renewed for a lease duration, as seen
    /// from here.
    async fn expired(&self, lease: &Lease, spec: &LeaseSpec) -> bool {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let mut observed = self.observed.lock().await;
        let since = match observed.as_ref() {
            Some((v, at)) if *v == version => *at,
            _ => {
                *observed = Some((version, Instant::now()));
                Instant::now()
            }
        };
        let duration = spec
            .lease_duration_seconds
            .map_or(self.config.lease_duration, |s| Duration::from_secs(s.max(0) as u64));
        since.elapsed() > duration
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else { return };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!("released the lease"),
            Err(e) => warn!(error = %e, "cannot release the lease; it expires by itself"),
        }
    }

    /// Stands by until this replica holds the lease, then runs `work` while
    /// renewing it. Returns when `work` ends (the lease is then released),
    /// or with [`LeaderError::Lost`] as soon as the lease cannot be kept —
    /// `work` is dropped then, so a replica that lost the lease stops
    /// writing before another can take it.
    pub async fn run<T>(
        &self,
        work: impl FnOnce() -> std::pin::Pin<Box<dyn Future<Output = T> + Send>>,
        on_leading: impl FnOnce(),
        shutdown: impl Future<Output = ()>,
    ) -> Result<T, LeaderError> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot read or take the lease"),
            }
            tokio::select! {
                _ = &mut shutdown => return Err(LeaderError::ShutDown),
                _ = tokio::time::sleep(self.config.renew_every) => {}
            }
        }
        on_leading();
        let mut work = work();
        let mut last_renewed = Instant::now();
        // Stop a renew period before others may see the lease as expired.
        let deadline = self.config.lease_duration.saturating_sub(self.config.renew_every);
        loop {
            tokio::select! {
                out = &mut work => {
                    self.release().await;
                    return Ok(out);
                }
                _ = tokio::time::sleep(self.config.renew_every) => {
                    match self.try_acquire_or_renew().await {
                        Ok(true) => last_renewed = Instant::now(),
                        Ok(false) => return Err(LeaderError::Lost(self.config.name.clone())),
                        Err(e) => {
                            warn!(error = %e, "cannot renew the lease");
                            if last_renewed.elapsed() >= deadline {
                                return Err(LeaderError::Lost(self.config.name.clone()));
                            }
                        }
                    }
                }
            }
        }
    }
}
