//! TLS for the clients that use provider-less rustls (gix's http transport, `rediss://` stores):
//! ring is installed as the process-wide crypto provider, once.

/// Installs ring as rustls's process default. Failing means another provider is already
/// installed: fine.
pub fn install_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
