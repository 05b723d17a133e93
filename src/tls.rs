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
