//! What every reconcile shares: the API client, the configuration, the
//! metrics, and what is kept between reconciles — the watches' caches,
//! the admin clients per Homeserver, the digest memo, the backoff.

use std::sync::Arc;

use kube::runtime::reflector::Store;
use kube::{Client, Resource, ResourceExt};
use tracing::{debug, warn};

use super::cache::WatchedScope;
use super::clients::ClientCache;
use super::digests::DigestMemo;
use super::requeue::Backoff;
use super::{Config, Error, MANAGER, UserIndex, events, fairness, transport};
use crate::api::{Homeserver, MatrixUser};
use crate::backend::Backend;
use crate::backend::mas::{MasBackend, MasClient, MasConfig};
use crate::metrics::Metrics;
use crate::secret::SecretString;
use crate::synapse::{ClientConfig, RequestObserver, SynapseClient};
use kube::runtime::events::EventType;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub metrics: Metrics,
    pub(super) events: events::Publisher,
    /// The MatrixUsers of every watched scope, to find two that claim one
    /// Matrix ID wherever they live.
    pub(super) users: Vec<Store<MatrixUser>>,
    /// The index of each of `users` (by position), where a watch keeps one:
    /// a store without one is scanned.
    pub(super) user_indexes: Vec<UserIndex>,
    pub(super) synapse_clients: ClientCache<SynapseFingerprint, SynapseClient>,
    pub(super) mas_clients: ClientCache<MasFingerprint, MasClient>,
    pub(super) digests: DigestMemo,
    pub(super) failures: Backoff,
    /// The caches of the controllers' watches, per scope: Homeservers and
    /// Secret metadata are read there rather than from the API server.
    /// Empty: every read goes to the API server.
    pub(super) watched: Vec<WatchedScope>,
    /// Each Homeserver's share of the MatrixUser controller's slots.
    pub(super) slots: fairness::Slots,
    /// When each Homeserver's accounts were last counted.
    pub(super) account_counts: super::accounts::Counts,
}

/// What a caller of [`Context::synapse_client`] needs of the Homeserver's
/// credentials.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Need {
    /// The admin token.
    Admin,
    /// The admin token and, when the spec names one, the registration
    /// shared secret.
    Registration,
}

/// What a Synapse client is made from: URL, token, registration shared
/// secret, request limit, CA bundle.
type SynapseFingerprint = (String, SecretString, Option<SecretString>, usize, Option<SecretString>);

/// What a MAS client is made from: URL, client ID, client secret, request
/// limit, CA bundle.
type MasFingerprint = (String, String, SecretString, usize, Option<SecretString>);

impl Context {
    pub fn new(client: Client, config: Config, users: Store<MatrixUser>, metrics: Metrics) -> Self {
        Self::with_scopes(client, config, vec![users], metrics)
    }

    /// A context shared by the controllers of several scopes, each with
    /// its cache of MatrixUsers.
    pub fn with_scopes(client: Client, config: Config, users: Vec<Store<MatrixUser>>, metrics: Metrics) -> Self {
        let events = events::Publisher::new(client.clone(), MANAGER);
        let slots = fairness::Slots::new(config.concurrency);
        Self {
            client,
            config,
            metrics,
            events,
            users,
            user_indexes: Vec::new(),
            synapse_clients: ClientCache::default(),
            mas_clients: ClientCache::default(),
            digests: DigestMemo::default(),
            failures: Backoff::default(),
            watched: Vec::new(),
            slots,
            account_counts: super::accounts::Counts::default(),
        }
    }

    /// Reads Homeservers and Secrets through the caches of these scopes'
    /// watches (and keeps Secret values per resourceVersion), instead of
    /// asking the API server on every reconcile.
    pub fn with_watches(mut self, scopes: Vec<WatchedScope>) -> Self {
        self.watched = scopes;
        self
    }

    /// Finds MatrixUsers through the indexes the watches keep of `users`
    /// (one per store, in order), instead of scanning the stores.
    pub fn with_user_indexes(mut self, indexes: Vec<UserIndex>) -> Self {
        self.user_indexes = indexes;
        self
    }

    /// The cached MatrixUsers, of every watched scope, that name one of
    /// `localparts` or record an account of one, and that `keep` selects:
    /// from the index where the store has one (`keep` then sees only
    /// those), else by a scan (`keep` sees every cached object: it must be
    /// cheap).
    pub(super) fn cached_users_of_localparts(
        &self,
        localparts: &[&str],
        keep: impl Fn(&MatrixUser) -> bool + Copy,
    ) -> Vec<Arc<MatrixUser>> {
        let mut found: Vec<Arc<MatrixUser>> = Vec::new();
        for (i, store) in self.users.iter().enumerate() {
            match self.user_indexes.get(i) {
                Some(index) => {
                    let mut refs: Vec<_> = localparts.iter().flat_map(|l| index.by_localpart(l)).collect();
                    refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
                    refs.dedup();
                    found.extend(refs.iter().filter_map(|r| store.get(r)).filter(|u| keep(u)));
                }
                None => found.extend(store.state_filter(keep)),
            }
        }
        found
    }

    /// The admin client of a Homeserver, made anew when its URL, token,
    /// registration shared secret, request limit or CA bundle changed.
    ///
    /// `Need::Registration`: a registration shared secret that cannot be
    /// read is an error (the Homeserver's check, so that it shows there).
    /// `Need::Admin`: the client goes without it and creates accounts the
    /// slower way; so a deletion policy never waits for that Secret (a
    /// namespace being deleted may have deleted it already).
    pub(super) async fn synapse_client(&self, hs: &Homeserver, need: Need) -> Result<SynapseClient, Error> {
        let ns = hs.namespace().unwrap_or_default();
        let token = self.secret_value(&ns, &hs.spec.admin_token_secret_ref).await?;
        let registration_shared_secret = match &hs.spec.registration_shared_secret_ref {
            Some(r) => match self.secret_value(&ns, r).await {
                Ok(secret) => Some(secret),
                Err(e) if need == Need::Admin => {
                    debug!(homeserver = %hs.name_any(), error = %e, "creating without the registration shared secret");
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        let limit = hs.spec.max_concurrent_requests.max(1) as usize;
        let ca_bundle = self.ca_bundle(hs).await?;
        let fingerprint = (
            hs.spec.url.clone(),
            token.clone(),
            registration_shared_secret.clone(),
            limit,
            ca_bundle.clone(),
        );
        self.synapse_clients.get_or_make((ns, hs.name_any()), fingerprint, || {
            SynapseClient::new(ClientConfig {
                base_url: hs.spec.url.clone(),
                admin_token: token,
                registration_shared_secret,
                max_concurrent_requests: limit,
                timeout: self.config.request_timeout,
                observer: Some(self.request_observer()),
                extra_roots: transport::extra_roots(hs, ca_bundle.as_ref())?,
            })
            .map_err(|e| Error::InvalidSpec(e.to_string()))
        })
    }

    /// Whether `digest` (from the status of `user`) is one of `password`.
    pub(super) fn digest_matches(&self, user: &MatrixUser, digest: &str, password: &SecretString) -> bool {
        let (ns, name) = (user.namespace().unwrap_or_default(), user.name_any());
        self.digests
            .matches((&ns, &name), digest, password, &self.config.digest_key)
    }

    /// Remembers that `digest` is one of `password`, for [`Self::digest_matches`].
    pub(super) fn remember_digest(&self, user: &MatrixUser, digest: &str, password: &SecretString) {
        let (ns, name) = (user.namespace().unwrap_or_default(), user.name_any());
        self.digests.remember((&ns, &name), digest, password);
    }

    /// Counts every backend request in the metrics.
    pub(super) fn request_observer(&self) -> RequestObserver {
        let metrics = self.metrics.clone();
        RequestObserver(Arc::new(move |endpoint, status, took| {
            metrics.admin_request(endpoint, status, took)
        }))
    }

    /// The MAS admin client of a Homeserver with `spec.mas`, made anew when
    /// its URL, client, request limit or CA bundle changed; `None` without
    /// `spec.mas`.
    /// Clones share the OAuth token, so it lives as long as the config.
    pub(super) async fn mas_client(&self, hs: &Homeserver) -> Result<Option<MasClient>, Error> {
        let Some(mas) = &hs.spec.mas else {
            return Ok(None);
        };
        let ns = hs.namespace().unwrap_or_default();
        let secret = self.secret_value(&ns, &mas.client_secret_ref).await?;
        let limit = hs.spec.max_concurrent_requests.max(1) as usize;
        let ca_bundle = self.ca_bundle(hs).await?;
        let fingerprint = (
            mas.url.clone(),
            mas.client_id.clone(),
            secret.clone(),
            limit,
            ca_bundle.clone(),
        );
        self.mas_clients
            .get_or_make((ns, hs.name_any()), fingerprint, || {
                Ok(MasClient::new(MasConfig {
                    base_url: mas.url.clone(),
                    client_id: mas.client_id.clone(),
                    client_secret: secret,
                    max_concurrent_requests: limit,
                    timeout: self.config.request_timeout,
                    observer: Some(self.request_observer()),
                    extra_roots: transport::extra_roots(hs, ca_bundle.as_ref())?,
                })?)
            })
            .map(Some)
    }

    /// Where a Homeserver's accounts live, with the clients to reach it.
    pub async fn backend(&self, hs: &Homeserver) -> Result<Backend, Error> {
        let synapse = self.synapse_client(hs, Need::Admin).await?;
        Ok(match self.mas_client(hs).await? {
            Some(mas) => Backend::Mas(MasBackend::new(mas, synapse)),
            None => Backend::Synapse(synapse),
        })
    }

    pub(super) async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        if let Err(e) = self.events.publish(&obj.object_ref(&()), type_, reason, note).await {
            warn!(error = %e, reason, "cannot publish an Event");
        }
    }
}
