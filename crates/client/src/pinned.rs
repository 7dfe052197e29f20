//! Trusting exactly one server certificate (certificate pinning): the
//! certificate the server presents must be byte for byte the pinned one,
//! whatever its issuer, name or CA flag, and the handshake must be signed
//! with its key.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{WebPkiSupportedAlgorithms, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};

/// Accepts the pinned certificate only.
#[derive(Debug)]
pub(crate) struct PinnedCert {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedCert {
    pub(crate) fn new(
        cert: CertificateDer<'static>,
        provider: &Arc<rustls::crypto::CryptoProvider>,
    ) -> PinnedCert {
        PinnedCert {
            cert,
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// An actionable message for a TLS failure, where one is known: a server
/// certificate that is a CA certificate (the usual self-signed one-liner
/// makes one) is refused by WebPKI rules.
pub(crate) fn explain(error: &std::io::Error) -> Option<&'static str> {
    let rustls_error = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    match rustls_error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if format!("{other:?}").contains("CaUsedAsEndEntity") =>
        {
            Some(CA_AS_SERVER_CERT)
        }
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            Some("the server's certificate is not the pinned one")
        }
        _ => None,
    }
}

const CA_AS_SERVER_CERT: &str = "the server's certificate is a CA certificate \
    (basicConstraints CA:TRUE), which TLS does not accept as a server's own \
    certificate. Either give the server a leaf certificate signed by a CA you \
    trust (openssl: -addext basicConstraints=critical,CA:FALSE -addext \
    extendedKeyUsage=serverAuth, signed with -CA/-CAkey), or trust exactly \
    this certificate with TlsOptions::pinned_cert";
