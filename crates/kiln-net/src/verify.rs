//! Certificate verifiers that remember why they refused.
//!
//! rustls turns a refused certificate into a TLS alert and an error string;
//! quinn hands the application only the string. To say *whose* certificate
//! failed, what its validity window is and what the clock said, each
//! handshake gets its own verifier wrapping webpki's, which keeps the
//! refused certificate's facts in a [`Slot`] the endpoint reads once the
//! handshake has failed. The decision itself is webpki's, unchanged, and so
//! is the alert the peer receives (`certificate_expired` stays that).

use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::validity::Window;

/// What a verifier knew when it refused a certificate.
#[derive(Clone, Debug)]
pub struct Refused {
    /// webpki's verdict.
    pub error: rustls::Error,
    /// The refused certificate's subject (as text; from the peer), if it parsed.
    pub subject: Option<String>,
    /// Its validity window, if it parsed.
    pub window: Option<Window>,
    /// The clock the verifier used, in UNIX seconds.
    pub now: i64,
}

/// Where one handshake's verifier leaves its refusal.
#[derive(Clone, Debug, Default)]
pub struct Slot(Arc<Mutex<Option<Refused>>>);

impl Slot {
    /// The refusal, if the verifier refused.
    pub fn take(&self) -> Option<Refused> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn record(&self, end_entity: &CertificateDer<'_>, now: UnixTime, error: &rustls::Error) {
        let parsed = x509_parser::parse_x509_certificate(end_entity).ok();
        let refused = Refused {
            error: error.clone(),
            subject: parsed.as_ref().map(|(_, c)| c.subject().to_string()),
            window: Window::of(end_entity),
            now: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
        };
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(refused);
    }
}

/// The client's check of the dispatcher's certificate.
#[derive(Debug)]
pub struct ServerVerifier {
    /// webpki's verifier with the bundle's CA as the only root.
    pub inner: Arc<dyn ServerCertVerifier>,
    /// Where a refusal goes.
    pub slot: Slot,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| self.slot.record(end_entity, now, e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }

    fn root_hint_subjects(&self) -> Option<&[DistinguishedName]> {
        self.inner.root_hint_subjects()
    }
}

/// The dispatcher's check of a client's certificate.
#[derive(Debug)]
pub struct ClientVerifier {
    /// webpki's verifier with the Kiln CA as the only root; client certificates mandatory.
    pub inner: Arc<dyn ClientCertVerifier>,
    /// Where a refusal goes.
    pub slot: Slot,
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| self.slot.record(end_entity, now, e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn requires_raw_public_keys(&self) -> bool {
        self.inner.requires_raw_public_keys()
    }
}
