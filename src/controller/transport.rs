//! How a Homeserver's servers are reached: the private CA its clients trust
//! (`spec.caBundleSecretRef`), and a warning for plain `http` that leaves
//! the cluster.

use std::net::Ipv4Addr;

use kube::ResourceExt;
use kube::runtime::events::EventType;
use tracing::warn;
use url::Host;

use super::{Context, Error};
use crate::api::Homeserver;
use crate::secret::SecretString;
use crate::tls::ExtraRoots;

impl Context {
    /// The PEM text of the Homeserver's CA bundle, when it names one. Part
    /// of its clients' fingerprints: a new bundle makes new clients.
    pub(super) async fn ca_bundle(&self, hs: &Homeserver) -> Result<Option<SecretString>, Error> {
        match &hs.spec.ca_bundle_secret_ref {
            Some(r) => Ok(Some(self.secret_value(&hs.namespace().unwrap_or_default(), r).await?)),
            None => Ok(None),
        }
    }
}

/// The certificates of `pem`, the Homeserver's CA bundle, or why they
/// cannot be used (naming the Secret and key, never the content).
pub(super) fn extra_roots(hs: &Homeserver, pem: Option<&SecretString>) -> Result<ExtraRoots, Error> {
    let (Some(r), Some(pem)) = (&hs.spec.ca_bundle_secret_ref, pem) else {
        return Ok(ExtraRoots::default());
    };
    ExtraRoots::from_pem(pem.expose().as_bytes()).map_err(|problem| Error::InvalidCaBundle {
        name: r.name.clone(),
        key: r.key.clone(),
        problem,
    })
}

/// Warns, with an Event, of each URL of the Homeserver that is plain `http`
/// to a host outside the cluster: the admin token, the MAS client's secret
/// and users' passwords would cross the network in clear text. Once per
/// spec generation: only while the status does not yet describe this one
/// (an Event is a write to etcd; a check runs at every resync).
pub(super) async fn warn_of_plain_http(ctx: &Context, hs: &Homeserver) {
    let observed = hs.status.as_ref().and_then(|s| s.observed_generation);
    if observed.is_some() && observed == hs.metadata.generation {
        return;
    }
    let urls = std::iter::once(("spec.url", hs.spec.url.as_str()))
        .chain(hs.spec.mas.as_ref().map(|m| ("spec.mas.url", m.url.as_str())));
    for (field, url) in urls {
        if let Some(host) = plain_http_leaving_cluster(url) {
            let note = format!(
                "{field} is plain http to {host}, outside the cluster: the admin token and passwords cross the network unencrypted; use https (spec.caBundleSecretRef trusts a private CA)"
            );
            warn!(field, %host, "plain http outside the cluster");
            ctx.publish(hs, EventType::Warning, "PlainHTTP", note).await;
        }
    }
}

/// The host of `url` if it is plain `http` to a host outside the cluster
/// (see [`stays_inside`]).
pub(crate) fn plain_http_leaving_cluster(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    if url.scheme() != "http" {
        return None;
    }
    let host = url.host()?;
    (!stays_inside(&host)).then(|| host.to_string())
}

/// Whether traffic to `host` stays inside the cluster or a private network:
///
/// - a single-label name: a Service of the Homeserver's namespace, found
///   through the pod's DNS search path (`synapse`);
/// - a name with a `svc` label after its first: a Service's name
///   `<service>.<namespace>.svc`, with any cluster domain after it
///   (`.cluster.local` by default, but it is configurable), or a pod of a
///   headless Service (`synapse-0.synapse.chat.svc.cluster.local`);
/// - `localhost` and names under `.localhost` (RFC 6761: loopback);
/// - IP literals that are loopback, private (RFC 1918, IPv6 unique local
///   `fc00::/7`), link-local, or of the shared `100.64.0.0/10` range, which
///   several CNIs and clouds use for pods: pod and Service IPs are of these.
///
/// Anything else, `synapse.chat` included (two labels look like a public
/// name: `example.com` resolves the same way), is taken as outside; the
/// warning it gets costs nothing but an Event.
fn stays_inside(host: &Host<&str>) -> bool {
    match host {
        Host::Domain(name) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            let labels: Vec<&str> = name.split('.').collect();
            labels.len() == 1 || labels.last() == Some(&"localhost") || labels.iter().skip(1).any(|l| *l == "svc")
        }
        Host::Ipv4(ip) => private_v4(ip),
        Host::Ipv6(ip) => {
            ip.is_loopback()
                || ip.is_unique_local()
                || ip.is_unicast_link_local()
                || ip.to_ipv4_mapped().is_some_and(|v4| private_v4(&v4))
        }
    }
}

fn private_v4(ip: &Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback() || ip.is_private() || ip.is_link_local() || (a == 100 && b & 0xc0 == 64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_inside_the_cluster_is_not_warned_of() {
        for inside in [
            "http://synapse:8008",
            "http://synapse.chat.svc:8008",
            "http://synapse.chat.svc.cluster.local:8008",
            "http://synapse.chat.svc.k8s.example.internal:8008/",
            "http://synapse-0.synapse.chat.svc.cluster.local:8008",
            "http://SYNAPSE.Chat.SVC:8008",
            "http://synapse.chat.svc.cluster.local.:8008",
            "http://localhost:8008",
            "http://matrix.localhost",
            "http://127.0.0.1:8008",
            "http://10.96.12.4:8008",
            "http://172.20.0.5",
            "http://192.168.1.10",
            "http://100.64.3.2",
            "http://169.254.1.1",
            "http://[::1]:8008",
            "http://[fd00::5]:8008",
            "http://[fe80::1]",
            "http://[::ffff:10.0.0.1]",
            // https is never warned of, wherever it goes.
            "https://matrix.example.org",
            "https://203.0.113.7",
        ] {
            assert_eq!(plain_http_leaving_cluster(inside), None, "{inside}");
        }
    }

    #[test]
    fn plain_http_outside_the_cluster_is_warned_of_by_its_host() {
        for (outside, host) in [
            ("http://matrix.example.org", "matrix.example.org"),
            ("http://synapse.chat:8008", "synapse.chat"),
            ("http://svc.example.org", "svc.example.org"),
            ("http://203.0.113.7:8008", "203.0.113.7"),
            ("http://172.32.0.1", "172.32.0.1"),
            ("http://100.128.0.1", "100.128.0.1"),
            ("http://[2001:db8::1]:8008", "[2001:db8::1]"),
            ("http://[::ffff:8.8.8.8]", "[::ffff:808:808]"),
        ] {
            assert_eq!(plain_http_leaving_cluster(outside).as_deref(), Some(host), "{outside}");
        }
    }
}
