//! A Homeserver behind TLS with a private CA (`spec.caBundleSecretRef`),
//! and the warning for plain http that leaves the cluster: the controller
//! against the fake API server, and the real Synapse behind a TLS proxy on
//! 127.0.0.1 whose certificate a CA made here signed.

use matrix_user_operator_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_kube::{FakeApiServer, path_of};
use common::fixtures::{homeserver_in, secret_in};
use common::mas::mas_standin;
use common::synapse;
use kube::runtime::reflector::store::Writer;
use matrix_user_operator::api::{Homeserver, MatrixUser};
use matrix_user_operator::backend::mas::{MasClient, MasConfig};
use matrix_user_operator::controller::{Config, Context, reconcile_homeserver};
use matrix_user_operator::metrics::Metrics;
use matrix_user_operator::secret::SecretString;
use matrix_user_operator::tls::ExtraRoots;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

const NS: &str = "chat";

/// A CA and the PEM of its certificate.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

fn new_ca(name: &str) -> Ca {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca {
        issuer: rcgen::Issuer::new(params, key),
        pem,
    }
}

/// A TLS server on 127.0.0.1 with a certificate for that address signed by
/// `ca`, passing every connection on to the test Synapse. Returns its
/// https base URL.
async fn tls_proxy_to_synapse(ca: &Ca) -> String {
    tls_proxy_to(&synapse().base_url, ca).await
}

/// [`tls_proxy_to_synapse`], to the http server at `upstream`.
async fn tls_proxy_to(upstream: &str, ca: &Ca) -> String {
    matrix_user_operator::tls::install_crypto_provider();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let key_der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key_der)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = url::Url::parse(upstream).unwrap();
    let upstream = format!(
        "{}:{}",
        upstream.host_str().unwrap(),
        upstream.port_or_known_default().unwrap()
    );
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
            tokio::spawn(async move {
                // A client that does not trust the certificate hangs up
                // here: nothing to pass on.
                let Ok(mut tls) = acceptor.accept(client).await else {
                    return;
                };
                let Ok(mut synapse) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut synapse).await;
            });
        }
    });
    format!("https://127.0.0.1:{port}")
}

fn context(client: kube::Client) -> Arc<Context> {
    let config = Config {
        // Only a guard: the URLs that cannot answer fail at once.
        request_timeout: Duration::from_secs(5),
        ..Config::default()
    };
    Arc::new(Context::new(
        client,
        config,
        Writer::<MatrixUser>::default().as_reader(),
        Metrics::new(),
    ))
}

/// A Homeserver not checked yet, at `url`, with the CA bundle `ca` (a
/// Secret name and key) when given.
fn homeserver(url: &str, ca: Option<(&str, &str)>) -> Value {
    let mut hs = homeserver_in(NS, "hs", json!({}));
    hs["status"] = Value::Null;
    hs["spec"]["url"] = json!(url);
    if let Some((name, key)) = ca {
        hs["spec"]["caBundleSecretRef"] = json!({"name": name, "key": key});
    }
    hs
}

/// Reconciles the stored Homeserver once; its Ready condition (status,
/// reason, message) and whether the reconcile returned an error.
async fn check(fake: &FakeApiServer, ctx: &Arc<Context>, hs: &Value) -> (String, String, String, bool) {
    let stored: Homeserver = serde_json::from_value(fake.get(&path_of(hs)).unwrap()).unwrap();
    let result = reconcile_homeserver(Arc::new(stored), ctx.clone()).await;
    let stored: Homeserver = serde_json::from_value(fake.get(&path_of(hs)).unwrap()).unwrap();
    let ready = stored
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    (ready.status, ready.reason, ready.message, result.is_err())
}

fn cluster() -> (kube::Client, FakeApiServer) {
    let (client, fake) = FakeApiServer::start();
    fake.put(secret_in(NS, "admin", "token", &synapse().admin_token));
    (client, fake)
}

#[tokio::test]
async fn a_private_ca_in_a_secret_is_trusted_for_the_homeserver() {
    let ca = new_ca("chat CA");
    let url = tls_proxy_to_synapse(&ca).await;
    let (client, fake) = cluster();
    let ctx = context(client);

    // Without the CA: the system's roots do not know it.
    let hs = homeserver(&url, None);
    fake.put(hs.clone());
    let (status, reason, message, retried) = check(&fake, &ctx, &hs).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Unreachable"),
        "{message}"
    );
    assert!(message.contains("certificate is not trusted"), "{message}");
    assert!(retried, "a certificate may be replaced: retried with backoff");

    // Another CA's bundle does not do either.
    let hs = homeserver(&url, Some(("synapse-ca", "ca.crt")));
    fake.put(hs.clone());
    fake.put(secret_in(NS, "synapse-ca", "ca.crt", &new_ca("another CA").pem));
    let (status, reason, message, _) = check(&fake, &ctx, &hs).await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "Unreachable"),
        "{message}"
    );

    // The right CA in the same Secret: a new client (the bundle is part
    // of the cached client's fingerprint), which trusts it.
    fake.put(secret_in(NS, "synapse-ca", "ca.crt", &ca.pem));
    let (status, reason, message, retried) = check(&fake, &ctx, &hs).await;
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Connected"), "{message}");
    assert!(!retried);
}

/// The MAS client trusts the bundle as Synapse's does: its token request
/// and its admin API call both go through the TLS server.
#[tokio::test]
async fn the_mas_client_trusts_the_private_ca_too() {
    let target = mas_standin().target();
    let ca = new_ca("MAS CA");
    let url = tls_proxy_to(&target.mas_url, &ca).await;
    let mut config = MasConfig::new(&url, &target.client_id, SecretString::new(&target.client_secret));
    let untrusted = MasClient::new(config.clone()).unwrap().version().await.unwrap_err();
    assert!(
        untrusted.to_string().contains("certificate is not trusted"),
        "{untrusted}"
    );
    config.extra_roots = ExtraRoots::from_pem(ca.pem.as_bytes()).unwrap();
    let version = MasClient::new(config).unwrap().version().await;
    assert!(version.is_ok(), "{version:?}");
}

#[tokio::test]
async fn a_bad_ca_bundle_stalls_the_homeserver_naming_the_secret_not_its_content() {
    let (client, fake) = cluster();
    let ctx = context(client);
    let hs = homeserver("https://127.0.0.1:9", Some(("synapse-ca", "ca.crt")));
    fake.put(hs.clone());
    let not_a_certificate = "-----BEGIN CERTIFICATE-----\nc2VjcmV0LWxvb2tpbmc=\n-----END CERTIFICATE-----\n";
    for content in ["not-a-pem-bundle-at-all", not_a_certificate] {
        fake.put(secret_in(NS, "synapse-ca", "ca.crt", content));
        let (status, reason, message, retried) = check(&fake, &ctx, &hs).await;
        assert_eq!(
            (status.as_str(), reason.as_str()),
            ("False", "InvalidCABundle"),
            "{message}"
        );
        assert!(
            message.contains("\"synapse-ca\"") && message.contains("\"ca.crt\""),
            "{message}"
        );
        assert!(
            !message.contains("not-a-pem") && !message.contains("c2VjcmV0"),
            "{message}"
        );
        assert!(!retried, "waits for a new Secret");
    }
}

/// The `PlainHTTP` Events the fake server was sent, by their notes.
fn plain_http_notes(fake: &FakeApiServer) -> Vec<String> {
    fake.requests()
        .iter()
        .filter(|r| r.path.ends_with("/events") && r.body["reason"] == "PlainHTTP")
        .map(|r| r.body["note"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn plain_http_leaving_the_cluster_is_warned_of_once_per_generation() {
    let (client, fake) = cluster();
    let ctx = context(client);
    // A documentation address (TEST-NET-3): outside, and it never answers.
    let hs = homeserver("http://203.0.113.7:8008", None);
    fake.put(hs.clone());
    check(&fake, &ctx, &hs).await;
    let notes = plain_http_notes(&fake);
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains("spec.url") && notes[0].contains("203.0.113.7"),
        "{notes:?}"
    );
    // The next check of the same generation (a resync) warns no more.
    check(&fake, &ctx, &hs).await;
    assert_eq!(plain_http_notes(&fake).len(), 1);
    // Nor does a Service's name, or the test Synapse on 127.0.0.1.
    for url in ["http://synapse.chat.svc:8008", synapse().base_url.as_str()] {
        fake.clear_requests();
        let hs = homeserver(url, None);
        fake.put(hs.clone());
        check(&fake, &ctx, &hs).await;
        assert!(plain_http_notes(&fake).is_empty(), "{url}");
    }
}
