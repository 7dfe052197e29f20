//! A throwaway test PKI, shared by the test suites that need TLS (this
//! crate's python_interop.rs, the client's tests/support and the
//! server's tests/support): a fresh CA and a leaf for `localhost` and
//! 127.0.0.1 signed by it, as PEM. The CA and the leaf have distinct
//! CommonNames (OpenSSL-based clients treat a leaf whose issuer equals its
//! subject as self-signed).

/// The CA certificate, the leaf certificate and the leaf's key, as PEM.
pub struct PemPki {
    /// The CA certificate.
    pub ca_pem: String,
    /// The leaf certificate (for `localhost` and 127.0.0.1).
    pub cert_pem: String,
    /// The leaf's private key.
    pub key_pem: String,
}

/// Generates a CA named `ca_name` and a leaf signed by it, with rcgen.
pub fn generate(ca_name: &str) -> PemPki {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, ca_name);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    // rcgen makes "127.0.0.1" an IP-address SAN.
    let mut leaf_params =
        rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("leaf params");
    leaf_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let leaf = leaf_params
        .signed_by(&leaf_key, &issuer)
        .expect("leaf cert");
    PemPki {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}
