//! The dispatcher in-process on 127.0.0.1 with freshly generated
//! certificates: who may connect, who may ask what, and what hostile bytes do.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on any unexpected error")]

use std::sync::Arc;
use std::time::Duration;

use kiln_dispatcher::{Config, Dispatcher};
use kiln_net::{Bundle, CloseCode, Connection, Listener, NetConfig, RequestError, connect};
use kiln_proto::Role;
use kiln_proto::wire::{ALPN, Registration, Reply, Request};
use tokio_util::sync::CancellationToken;

struct Server {
    dir: tempfile::TempDir,
    addr: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start() -> Server {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        kiln_net::certs::init(&certs, &["localhost".into(), "127.0.0.1".into()]).unwrap();
        let bundle = Bundle::load(&certs.join("dispatcher")).unwrap();
        let listener = Listener::bind(&bundle, "127.0.0.1:0".parse().unwrap(), NetConfig::default()).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let shutdown = CancellationToken::new();
        let config = Config {
            state_dir: dir.path().join("state"),
            max_pack_bytes: 1 << 20,
            git_limits: kiln_git::Limits::default(),
            job_timeout: Duration::from_secs(60),
            resume_grace: Duration::from_secs(20),
        };
        let token = shutdown.clone();
        let task = tokio::spawn(async move { Dispatcher::run(listener, config, token).await.unwrap() });
        Server { dir, addr, shutdown, task }
    }

    fn bundle(&self, role: Role, name: &str) -> Bundle {
        let path = kiln_net::certs::issue(&self.dir.path().join("certs"), role, name).unwrap();
        Bundle::load(&path).unwrap()
    }

    async fn client(&self, role: Role, name: &str) -> Connection {
        connect(&self.bundle(role, name), &self.addr, NetConfig::default()).await.unwrap()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task).await.unwrap().unwrap();
    }
}

/// An admin request that must still be answered: the dispatcher is alive for others.
async fn still_serves(admin: &Connection) {
    let (_, _, reply) = admin.request(&Request::GetResults { commit: None }).await.unwrap();
    assert_eq!(reply, Reply::Report(None));
}

async fn closed_with(conn: &Connection, code: CloseCode) -> String {
    let reason = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("connection not closed");
    assert!(reason.contains(&code.to_string()), "{reason}");
    reason
}

#[tokio::test]
async fn an_observer_cannot_take_jobs_and_others_carry_on() {
    let server = Server::start().await;
    let admin = server.client(Role::Admin, "admin").await;
    let observer = server.client(Role::Observer, "obs").await;
    match observer.request(&Request::Register(Registration { slots: 1, held: vec![], sandbox_gaps: vec![] })).await {
        Err(RequestError::Refused(reason)) => assert!(reason.contains("may not register as a runner"), "{reason}"),
        Err(RequestError::Connection(reason)) => assert!(reason.contains("unauthorized"), "{reason}"),
        other => panic!("observer registered: {other:?}"),
    }
    let reason = closed_with(&observer, CloseCode::Unauthorized).await;
    assert!(reason.contains("observer obs may not register as a runner"), "{reason}");
    // A runner may not read results either.
    let runner = server.client(Role::Runner, "r1").await;
    assert!(runner.request(&Request::GetResults { commit: None }).await.is_err());
    closed_with(&runner, CloseCode::Unauthorized).await;
    still_serves(&admin).await;
    server.stop().await;
}

#[tokio::test]
async fn garbage_and_oversized_frames_close_only_that_peer() {
    let server = Server::start().await;
    let admin = server.client(Role::Admin, "admin").await;

    let garbage = server.client(Role::Runner, "garbage").await;
    let (mut send, _recv) = garbage.open().await.unwrap();
    send.send_raw(&[0, 0, 0, 3, 0xff, 0xfe, 0xfd]).await.unwrap();
    closed_with(&garbage, CloseCode::Protocol).await;

    let huge = server.client(Role::Runner, "huge").await;
    let (mut send, _recv) = huge.open().await.unwrap();
    // Announces 4 GiB; must be refused from the prefix alone.
    send.send_raw(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let reason = closed_with(&huge, CloseCode::Protocol).await;
    assert!(reason.contains("exceeds the limit"), "{reason}");

    let truncated = server.client(Role::Runner, "truncated").await;
    let (mut send, _recv) = truncated.open().await.unwrap();
    send.send_raw(&[0, 0, 0, 10, 1]).await.unwrap();
    send.finish();
    closed_with(&truncated, CloseCode::Protocol).await;

    still_serves(&admin).await;
    server.stop().await;
}

/// A raw rustls client config, for peers `kiln_net::connect` would never build.
fn raw_client(roots_from: &Bundle, with_cert: Option<&Bundle>) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(roots_from.ca.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut crypto = match with_cert {
        Some(b) => builder.with_client_auth_cert(vec![b.cert.clone()], b.key.clone_key()).unwrap(),
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(crypto).unwrap()))
}

/// Connects and tries one request; returns the error the peer saw.
async fn attempt(server: &Server, config: quinn::ClientConfig) -> String {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(config);
    let conn = match endpoint.connect(server.addr.parse().unwrap(), "127.0.0.1").unwrap().await {
        Ok(conn) => conn,
        Err(e) => return format!("{e:?}"),
    };
    // The server's refusal may only show on the first stream.
    let result = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&kiln_proto::frame::encode(&Request::GetResults { commit: None }).unwrap()).await?;
        let mut buf = [0u8; 1];
        recv.read_exact(&mut buf).await?;
        Ok::<(), Box<dyn std::error::Error>>(())
    }
    .await;
    match result {
        Ok(()) => "request answered".to_owned(),
        Err(e) => format!("{e:?}"),
    }
}

#[tokio::test]
async fn clients_without_a_kiln_certificate_are_refused_at_the_handshake() {
    let server = Server::start().await;
    let admin = server.bundle(Role::Admin, "admin");

    // No client certificate at all.
    let err = attempt(&server, raw_client(&admin, None)).await;
    // TLS alert 116 (certificate_required) travels as QUIC crypto error 0x174.
    assert!(err.contains("crypto(74)") && err.contains("peer sent no certificates"), "{err}");

    // A certificate from another CA (with the same names and role).
    let other = tempfile::tempdir().unwrap();
    kiln_net::certs::init(other.path(), &[]).unwrap();
    let foreign = Bundle::load(&kiln_net::certs::issue(other.path(), Role::Admin, "admin").unwrap()).unwrap();
    let err = attempt(&server, raw_client(&admin, Some(&foreign))).await;
    // Both CAs are named "Kiln CA", so the chain is found and its signature fails.
    assert!(err.contains("invalid peer certificate: BadSignature"), "{err}");

    // The dispatcher's own client helper words it for people.
    let err = connect(&foreign, &server.addr, NetConfig::default()).await;
    let err = match err {
        Ok(conn) => conn.request(&Request::GetResults { commit: None }).await.unwrap_err().to_string(),
        Err(e) => kiln_proto::error_chain(&e),
    };
    assert!(err.contains("TLS handshake was refused"), "{err}");

    // And a proper admin is answered.
    assert_eq!(attempt(&server, raw_client(&admin, Some(&admin))).await, "request answered");
    server.stop().await;
}
