//! One TLS crypto provider for the whole process.
//!
//! kube is built with `ring` and reqwest without a provider of its own, so
//! both use rustls's process-wide default, set here: two providers in one
//! process make rustls panic when it has to choose.

/// Installs `ring` as the process-wide rustls provider. Idempotent.
pub fn install_crypto_provider() {
    // Err means a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The largest CA bundle read: a few hundred CA certificates. A bundle is
/// read whole, and a Secret holds up to 1 MiB anyway.
pub const MAX_CA_BUNDLE_BYTES: usize = 1 << 20;

/// Certificates of private CAs, trusted in addition to the system's roots.
/// Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct ExtraRoots(std::sync::Arc<[rustls::pki_types::CertificateDer<'static>]>);

/// Why a CA bundle cannot be used. The messages never quote the bundle.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CaBundleError {
    #[error("it is {len} bytes, over the limit of {MAX_CA_BUNDLE_BYTES} bytes")]
    TooLarge { len: usize },
    #[error("it is not valid PEM")]
    NotPem,
    #[error("it holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate,
    #[error("its certificate number {number} is not a valid X.509 certificate")]
    BadCertificate { number: usize },
}

impl ExtraRoots {
    /// The certificates of a PEM bundle (cert-manager's `ca.crt`, say): at
    /// least one, each a certificate rustls accepts as a trust anchor.
    /// Other PEM sections (a private key) are skipped.
    pub fn from_pem(pem: &[u8]) -> Result<Self, CaBundleError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        if pem.len() > MAX_CA_BUNDLE_BYTES {
            return Err(CaBundleError::TooLarge { len: pem.len() });
        }
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            // The parser's errors quote the offending line: left out.
            .map_err(|_| CaBundleError::NotPem)?;
        if certs.is_empty() {
            return Err(CaBundleError::NoCertificate);
        }
        // Parsed here as the TLS client will, so that a bad one shows on the
        // Homeserver rather than as a failure to build its client.
        let mut store = rustls::RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            store
                .add(cert.clone())
                .map_err(|_| CaBundleError::BadCertificate { number: i + 1 })?;
        }
        Ok(Self(certs.into()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The certificates, as reqwest takes them.
    pub(crate) fn certificates(&self) -> Result<Vec<reqwest::Certificate>, reqwest::Error> {
        self.0.iter().map(|der| reqwest::Certificate::from_der(der)).collect()
    }
}

/// What a failed connection's error says of the server's certificate, in
/// words of our own (rustls's would quote names from the certificate, which
/// the server chose), or `None` when the failure is not about it.
pub fn certificate_problem(error: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::CertificateError as C;
    let mut next = Some(error);
    while let Some(e) = next {
        // rustls's error reaches reqwest wrapped in io::Errors (one in
        // another), whose `source()` skips what they wrap.
        let mut inner: &(dyn std::error::Error + 'static) = e;
        while let Some(wrapped) = inner.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()) {
            inner = wrapped;
        }
        if let Some(rustls::Error::InvalidCertificate(problem)) = inner.downcast_ref::<rustls::Error>() {
            return Some(match problem {
                C::UnknownIssuer => {
                    "the server's TLS certificate is not trusted: no trusted CA signed it (for a private CA, set spec.caBundleSecretRef)"
                }
                C::NotValidForName | C::NotValidForNameContext { .. } => {
                    "the server's TLS certificate is not valid for the URL's host name"
                }
                C::Expired | C::ExpiredContext { .. } => "the server's TLS certificate has expired",
                C::NotValidYet | C::NotValidYetContext { .. } => "the server's TLS certificate is not valid yet",
                _ => "the server's TLS certificate is not accepted",
            });
        }
        next = e.source();
    }
    None
}

/// How a transport error reads in a message: what is wrong with the
/// server's certificate, if that is the problem, else the error itself.
pub fn describe_transport(error: &reqwest::Error) -> String {
    match certificate_problem(error) {
        Some(problem) => problem.to_string(),
        None => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca_pem(name: &str) -> String {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().pem()
    }

    #[test]
    fn a_ca_bundle_is_every_certificate_of_its_pem() {
        let one = ca_pem("one");
        assert_eq!(ExtraRoots::from_pem(one.as_bytes()).unwrap().0.len(), 1);
        // A bundle of two, with text and a private key between them
        // (skipped), as `cat` makes one.
        let key = rcgen::KeyPair::generate().unwrap().serialize_pem();
        let bundle = format!("# internal CAs\n{one}\n{key}{}", ca_pem("two"));
        let roots = ExtraRoots::from_pem(bundle.as_bytes()).unwrap();
        assert_eq!(roots.0.len(), 2);
        assert_eq!(roots.certificates().unwrap().len(), 2);
    }

    #[test]
    fn a_bad_ca_bundle_says_what_is_wrong_without_quoting_it() {
        let one = ca_pem("one");
        let body = one.lines().filter(|l| !l.starts_with("-----")).collect::<String>();
        let cases: [(String, CaBundleError); 5] = [
            ("secret-looking garbage".into(), CaBundleError::NoCertificate),
            (String::new(), CaBundleError::NoCertificate),
            (
                rcgen::KeyPair::generate().unwrap().serialize_pem(),
                CaBundleError::NoCertificate,
            ),
            (
                "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n".into(),
                CaBundleError::NotPem,
            ),
            (
                // Valid Base64, not a certificate, after a good one.
                format!(
                    "{one}-----BEGIN CERTIFICATE-----\nc2VjcmV0LWxvb2tpbmcgZ2FyYmFnZQ==\n-----END CERTIFICATE-----\n"
                ),
                CaBundleError::BadCertificate { number: 2 },
            ),
        ];
        for (pem, expected) in cases {
            let error = ExtraRoots::from_pem(pem.as_bytes()).unwrap_err();
            assert_eq!(error, expected, "{pem}");
            let message = error.to_string();
            for quoted in ["garbage", "base64", "c2VjcmV0", &body[..20]] {
                assert!(!message.contains(quoted), "{message}");
            }
        }
        let huge = format!("{one}{}", " ".repeat(MAX_CA_BUNDLE_BYTES));
        assert_eq!(
            ExtraRoots::from_pem(huge.as_bytes()).unwrap_err(),
            CaBundleError::TooLarge { len: huge.len() }
        );
    }
}
