//! The TLS of the QUIC and TCP transports: the gateway's certificate, and the client's
//! pin of it.
//!
//! TLS here protects nothing the session needs (Noise does that, end to end); it lets
//! the session's packets pass networks that let only QUIC or HTTPS through. It is still
//! never unverified: the gateway's certificate is derived from its static private key
//! (an Ed25519 key, a self-signed certificate with fixed fields, so the same key always
//! gives the same certificate, on every node of a cluster and across restarts), and the
//! client accepts exactly the certificate whose SHA-256 it was given (`jvpn tls-pin`
//! prints it; the gateway says it when it starts).

use std::sync::Arc;

use base64::Engine;
use jvpn_core::crypto::Keypair;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The ALPN protocol both transports announce.
pub const ALPN: &[u8] = b"jvpn/1";

/// The name the client asks for (SNI) and the certificate names.
pub const SERVER_NAME: &str = "jvpn";

/// The label the certificate key is derived with.
const LABEL: &[u8] = b"jumping-vpn/1 tls identity";

/// The PKCS#8 (RFC 8410) prefix of an Ed25519 private key, before its 32-byte seed.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate could not be made.
    #[error("cannot make the gateway's TLS certificate: {0}")]
    Certificate(String),
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Config(#[from] rustls::Error),
    /// A pin that is not `sha256:` and 44 characters of base64.
    #[error("{0:?} is not a certificate pin (\"sha256:\" and 44 characters of base64, as `jvpn tls-pin` prints)")]
    BadPin(String),
}

/// The SHA-256 of the certificate a client accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TlsPin([u8; 32]);

impl std::fmt::Debug for TlsPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

impl std::fmt::Display for TlsPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sha256:{}",
            base64::engine::general_purpose::STANDARD.encode(self.0)
        )
    }
}

impl std::str::FromStr for TlsPin {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, TlsError> {
        let bad = || TlsError::BadPin(s.to_string());
        let b64 = s.trim().strip_prefix("sha256:").ok_or_else(bad)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|_| bad())?;
        Ok(TlsPin(bytes.try_into().map_err(|_| bad())?))
    }
}

impl TlsPin {
    fn of(cert: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, cert);
        let mut pin = [0u8; 32];
        pin.copy_from_slice(digest.as_ref());
        TlsPin(pin)
    }
}

/// The gateway's TLS identity: its certificate and key.
pub struct TlsIdentity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl TlsIdentity {
    /// The identity derived from the gateway's static key pair.
    pub fn for_gateway(keypair: &Keypair) -> Result<Self, TlsError> {
        let seed = keypair.derive(LABEL);
        let mut pkcs8 = Vec::with_capacity(48);
        pkcs8.extend_from_slice(&ED25519_PKCS8_PREFIX);
        pkcs8.extend_from_slice(seed.as_ref());
        let key = PrivatePkcs8KeyDer::from(pkcs8);
        let signer = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&key, &rcgen::PKCS_ED25519)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        // Fixed fields: the same key gives the same certificate, byte for byte.
        params.not_before = rcgen::date_time_ymd(2025, 1, 1);
        params.not_after = rcgen::date_time_ymd(4000, 1, 1);
        params.serial_number = Some(rcgen::SerialNumber::from(1u64));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "jvpn gateway");
        let cert = params
            .self_signed(&signer)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        Ok(TlsIdentity {
            cert: cert.der().clone(),
            key,
        })
    }

    /// The pin a client is given.
    pub fn pin(&self) -> TlsPin {
        TlsPin::of(&self.cert)
    }

    /// The server side: TLS 1.3, ALPN `jvpn/1`, this certificate.
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(
                vec![self.cert.clone()],
                PrivateKeyDer::Pkcs8(self.key.clone_key()),
            )?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

/// The client side: TLS 1.3, ALPN `jvpn/1`, accepting only the certificate `pin` names.
pub fn client_config(pin: TlsPin) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedServer { pin, provider }))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

/// The server name the client connects to.
pub fn server_name() -> ServerName<'static> {
    ServerName::DnsName(
        rustls::pki_types::DnsName::try_from(SERVER_NAME)
            .unwrap_or_else(|_| unreachable!("a constant valid DNS name")),
    )
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the one certificate its pin names (no chain, no names, no dates: the pin is
/// the trust), and checks that the server holds its key, as any verifier does.
#[derive(Debug)]
struct PinnedServer {
    pin: TlsPin,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if TlsPin::of(end_entity) == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_gives_one_certificate_and_its_pin_round_trips() {
        let key = Keypair::generate().expect("key");
        let a = TlsIdentity::for_gateway(&key).expect("identity");
        let b = TlsIdentity::for_gateway(&key).expect("identity");
        assert_eq!(a.pin(), b.pin(), "deterministic");
        let other = TlsIdentity::for_gateway(&Keypair::generate().expect("key")).expect("identity");
        assert_ne!(a.pin(), other.pin());
        let text = a.pin().to_string();
        assert_eq!(text.parse::<TlsPin>().expect("parses"), a.pin());
        assert!("sha256:abc".parse::<TlsPin>().is_err());
        assert!("md5:AAAA".parse::<TlsPin>().is_err());
        a.server_config().expect("server config");
        client_config(a.pin()).expect("client config");
    }
}
