//! Mutual TLS between peers. Certificates are self-signed; what makes a peer
//! trusted is the hash of its certificate (its peer id) being on this device's
//! list. The client checks that the server's certificate hashes to the peer id
//! it meant to reach; the server asks for a client certificate and accepts only
//! those of known peers. Either way the handshake's signatures are verified, so
//! the other side holds the private key of the certificate it showed.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use rustls::DigitallySignedStruct;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DistinguishedName, SignatureScheme};

use crate::device::PeerId;
use crate::error::{Error, Result};
use crate::identity::Identity;

/// The name a client asks for; never checked (the certificate's hash is).
pub const SERVER_NAME: &str = "latus";

/// The peers allowed to connect, shared with the server's verifier so that a
/// peer added while the daemon runs is accepted at its next connection.
pub type Allowed = Arc<RwLock<HashSet<PeerId>>>;

/// ring's TLS 1.3 suites, AES-128-GCM first: as safe for this use, and about a
/// quarter less CPU per byte than AES-256-GCM, which every byte synced pays on
/// both sides.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    })
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

fn tls_error(what: &str, e: rustls::Error) -> Error {
    Error::Peer(format!("TLS {what}: {e}"))
}

fn own_key(identity: &Identity) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    (
        vec![CertificateDer::from(identity.cert_der.clone())],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der.clone())),
    )
}

/// The configuration to accept connections from the peers in `allowed`.
pub fn server_config(identity: &Identity, allowed: Allowed) -> Result<Arc<rustls::ServerConfig>> {
    let (certs, key) = own_key(identity);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("versions", e))?
        .with_client_cert_verifier(Arc::new(KnownPeers { allowed }))
        .with_single_cert(certs, key)
        .map_err(|e| tls_error("own certificate", e))?;
    Ok(Arc::new(config))
}

/// The configuration to connect to the peer `expected`, and to no other.
pub fn client_config(identity: &Identity, expected: PeerId) -> Result<Arc<rustls::ClientConfig>> {
    let (certs, key) = own_key(identity);
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("versions", e))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedPeer { expected }))
        .with_client_auth_cert(certs, key)
        .map_err(|e| tls_error("own certificate", e))?;
    Ok(Arc::new(config))
}

/// The peer id proven by the certificates a finished handshake showed.
pub fn peer_of(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerId> {
    certs
        .and_then(|c| c.first())
        .map(|cert| PeerId::of_certificate(cert))
        .ok_or_else(|| Error::Peer("the peer showed no certificate".into()))
}

/// The signature checks both verifiers share: ring's algorithms, as rustls's
/// own verifiers do (the two traits ask for the same three methods).
macro_rules! handshake_signatures_by_ring {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(message, cert, dss, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

#[derive(Debug)]
struct PinnedPeer {
    expected: PeerId,
}

impl ServerCertVerifier for PinnedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        if PeerId::of_certificate(end_entity) == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the server is not peer {}",
                self.expected
            )))
        }
    }

    handshake_signatures_by_ring!();
}

#[derive(Debug)]
struct KnownPeers {
    allowed: Allowed,
}

impl ClientCertVerifier for KnownPeers {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let id = PeerId::of_certificate(end_entity);
        let known = self
            .allowed
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&id);
        if known {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::warn!("refused a connection from unknown peer {id}");
            Err(rustls::Error::General(format!("unknown peer {id}")))
        }
    }

    handshake_signatures_by_ring!();

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    fn identity() -> (tempfile::TempDir, Identity) {
        let dir = tempfile::tempdir().unwrap();
        let identity = Identity::load_or_create(dir.path()).unwrap().0;
        (dir, identity)
    }

    /// Serves one connection on loopback; returns what the server saw and the
    /// client's result.
    async fn handshake(
        server: &Identity,
        allowed: &[PeerId],
        client: &Identity,
        expected: PeerId,
    ) -> (Result<PeerId>, Result<PeerId>) {
        let allowed: Allowed = Arc::new(RwLock::new(allowed.iter().copied().collect()));
        let acceptor = tokio_rustls::TlsAcceptor::from(server_config(server, allowed).unwrap());
        let connector = tokio_rustls::TlsConnector::from(client_config(client, expected).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor
                .accept(tcp)
                .await
                .map_err(|e| Error::Peer(e.to_string()))?;
            let peer = peer_of(tls.get_ref().1.peer_certificates())?;
            tls.write_all(b"hello")
                .await
                .map_err(|e| Error::io("tls", e))?;
            tls.shutdown().await.ok();
            Ok(peer)
        });
        let client_side = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from(SERVER_NAME).unwrap();
            let mut tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| Error::Peer(e.to_string()))?;
            let peer = peer_of(tls.get_ref().1.peer_certificates())?;
            let mut got = Vec::new();
            tls.read_to_end(&mut got)
                .await
                .map_err(|e| Error::Peer(e.to_string()))?;
            assert_eq!(got, b"hello");
            Ok(peer)
        };
        let client_result = tokio::time::timeout(std::time::Duration::from_secs(10), client_side)
            .await
            .unwrap_or_else(|_| Err(Error::Peer("timed out".into())));
        let server_result = tokio::time::timeout(std::time::Duration::from_secs(10), served)
            .await
            .map(|joined| joined.unwrap())
            .unwrap_or_else(|_| Err(Error::Peer("timed out".into())));
        (server_result, client_result)
    }

    #[tokio::test]
    async fn known_peers_connect_and_learn_each_others_id() {
        let ((_a, a), (_b, b)) = (identity(), identity());
        let (server, client) = handshake(&a, &[b.peer_id()], &b, a.peer_id()).await;
        assert_eq!(server.unwrap(), b.peer_id());
        assert_eq!(client.unwrap(), a.peer_id());
    }

    #[tokio::test]
    async fn an_unknown_client_is_refused_before_any_data() {
        let ((_a, a), (_b, b), (_c, c)) = (identity(), identity(), identity());
        let (server, client) = handshake(&a, &[c.peer_id()], &b, a.peer_id()).await;
        assert!(server.is_err());
        assert!(client.is_err(), "the unknown client read data");
    }

    #[tokio::test]
    async fn a_server_that_is_not_the_expected_peer_is_refused() {
        let ((_a, a), (_b, b), (_c, c)) = (identity(), identity(), identity());
        let (server, client) = handshake(&a, &[b.peer_id()], &b, c.peer_id()).await;
        let err = client.unwrap_err().to_string();
        assert!(err.contains("is not peer"), "{err}");
        assert!(server.is_err());
    }
}
