//! HBONE on loopback with real TLS and HTTP/2: a tunnel carries bytes both
//! ways; wrong server identities, foreign trust domains, expired and forged
//! client certificates fail the handshake; a refused tunnel gets its status.
use std::{sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::{
    RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use time::OffsetDateTime;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{tls::*, *};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        let root = cert.der().clone();
        Ca { issuer: Issuer::new(params, key), root }
    }

    fn roots(&self) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        roots.add(self.root.clone()).unwrap();
        Arc::new(roots)
    }

    fn issue_valid(&self, id: &str, from: OffsetDateTime, to: OffsetDateTime) -> Credentials {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = from;
        params.not_after = to;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Credentials {
            chain: vec![cert.der().clone()],
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()))),
        }
    }

    fn issue(&self, id: &str) -> Credentials {
        let now = OffsetDateTime::now_utc();
        self.issue_valid(id, now - Duration::from_secs(60), now + Duration::from_secs(3600))
    }
}

const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
const B: &str = "spiffe://cluster.local/ns/shop/sa/b";

/// Echoes what it reads, and refuses targets on port 9 with 403. Keeps what
/// each tunnel's request said of its source.
/// What a tunnel's CONNECT said: baggage, forwarded host, connection id.
type Said = (Option<Baggage>, Option<String>, Option<String>);

struct Echo {
    addr: SocketAddr,
    closed: std::sync::Mutex<Vec<(String, (u64, u64))>>,
    said: std::sync::Mutex<Vec<Said>>,
}

impl Echo {
    fn new(addr: SocketAddr) -> Echo {
        Echo { addr, closed: Default::default(), said: Default::default() }
    }
}

impl TunnelHandler for Echo {
    async fn handle(&self, request: TunnelRequest) {
        self.said.lock().unwrap().push((
            request.baggage.clone(),
            request.service_host.clone(),
            request.connection_id.clone(),
        ));
        if request.target.port() == 9 {
            return request.refuse(StatusCode::FORBIDDEN);
        }
        let Ok(upstream) = TcpStream::connect(self.addr).await else {
            return request.refuse(StatusCode::SERVICE_UNAVAILABLE);
        };
        let peer = request.peer.identity.to_string();
        let Ok(tunnel) = request.accept() else { return };
        let bytes = relay(upstream, tunnel).await.unwrap_or((0, 0));
        self.closed.lock().unwrap().push((peer, bytes));
    }
}

/// A TCP echo server on loopback.
async fn echo_server() -> SocketAddr {
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    echo_addr
}

/// An HBONE server for `server` on loopback, forwarding to an echo server.
async fn start(ca: &Ca, server: &Credentials) -> (SocketAddr, Arc<Echo>) {
    let echo_addr = echo_server().await;
    let handler = Arc::new(Echo::new(echo_addr));
    let config = Arc::new(server_config(server, ca.roots(), Arc::default(), "cluster.local").unwrap());
    let hbone = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hbone.local_addr().unwrap();
    let h = handler.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = hbone.accept().await {
            let (config, h) = (config.clone(), h.clone());
            tokio::spawn(async move { serve(tcp, config, h, std::future::pending(), HANDSHAKE_TIMEOUT).await });
        }
    });
    (addr, handler)
}

async fn dial(
    addr: SocketAddr,
    me: &Credentials,
    roots: Arc<RootCertStore>,
    expect: &str,
) -> io::Result<PeerConnection> {
    let config = Arc::new(client_config(me, roots, Arc::default(), expect.parse().unwrap()).unwrap());
    PeerConnection::handshake(TcpStream::connect(addr).await?, config).await
}

/// What a pool dials with: [`dial`], owning what it needs (the pool may dial
/// in the background).
fn dialer(
    addr: SocketAddr,
    me: &Credentials,
    roots: Arc<RootCertStore>,
    expect: &str,
) -> impl Fn() -> futures_util::future::BoxFuture<'static, io::Result<PeerConnection>> + use<> {
    let config = Arc::new(client_config(me, roots, Arc::default(), expect.parse().unwrap()).unwrap());
    move || {
        let config = config.clone();
        Box::pin(async move { PeerConnection::handshake(TcpStream::connect(addr).await?, config).await })
    }
}

#[tokio::test]
async fn a_tunnel_carries_bytes_both_ways() {
    let ca = Ca::new();
    let (addr, echo) = start(&ca, &ca.issue(B)).await;
    let peer = dial(addr, &ca.issue(A), ca.roots(), B).await.unwrap();

    // Several tunnels on one connection (multiplexed), each with its own data.
    for round in 0..3u8 {
        let tunnel = peer.connect("10.0.0.2:8080".parse::<SocketAddr>().unwrap()).await.unwrap();
        let (mut app, proxy_side) = tokio::io::duplex(1 << 16);
        let relay = tokio::spawn(relay(proxy_side, tunnel));
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i as u8).wrapping_add(round)).collect();
        let (mut r, mut w) = tokio::io::split(&mut app);
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = r.read_to_end(&mut back);
        let (_, n) = tokio::join!(send, recv);
        assert_eq!(n.unwrap(), payload.len());
        assert!(back == payload, "echoed bytes differ");
        assert_eq!(relay.await.unwrap().unwrap(), (300_000, 300_000));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let closed = echo.closed.lock().unwrap().clone();
    assert_eq!(closed.len(), 3);
    assert!(closed.iter().all(|(peer, bytes)| peer == A && *bytes == (300_000, 300_000)), "{closed:?}");

    // A refused tunnel carries the server's status.
    let err = peer.connect("10.0.0.2:9".parse::<SocketAddr>().unwrap()).await.err().unwrap();
    assert!(err.is_policy_refusal(), "{err:?}");
    assert!(err.to_string().contains("403"), "{err}");
}

/// Istio's `baggage` and `forwarded`, and mesh's connection id, go with a
/// tunnel's CONNECT and are read by the server; a tunnel without them has
/// none; an id that is not one is dropped.
#[tokio::test]
async fn a_tunnel_says_its_source_as_istios_proxies_do() {
    let ca = Ca::new();
    let (addr, echo) = start(&ca, &ca.issue(B)).await;
    let peer = dial(addr, &ca.issue(A), ca.roots(), B).await.unwrap();
    let source = Baggage {
        namespace: Some("shop".into()),
        workload: Some("a-1".into()),
        service: Some("a".into()),
        ..Baggage::default()
    };
    let host = "web.shop.svc.cluster.local";
    let target = Connect {
        authority: "10.0.0.2:8080".parse().unwrap(),
        baggage: source.to_header(),
        forwarded: headers::forwarded("10.0.0.1".parse().unwrap(), Some(host)),
        connection_id: Some(http::HeaderValue::from_static("00F067aa0ba902b7")),
    };
    drop(peer.connect(target.clone()).await.unwrap());
    drop(peer.connect("10.0.0.2:8080".parse::<SocketAddr>().unwrap()).await.unwrap());
    let bad = Connect { connection_id: Some(http::HeaderValue::from_static("../etc")), ..target };
    drop(peer.connect(bad).await.unwrap());
    let said = echo.said.lock().unwrap().clone();
    let id = Some("00f067aa0ba902b7".to_owned());
    assert_eq!(
        said,
        [
            (Some(source.clone()), Some(host.to_owned()), id),
            (None, None, None),
            (Some(source), Some(host.to_owned()), None)
        ]
    );
}

/// A tunnel read and written as a stream (TunnelIo): a megabyte each way,
/// past the flow-control windows, with bytes already taken read first.
#[tokio::test]
async fn a_tunnel_is_a_stream() {
    let ca = Ca::new();
    let (addr, _) = start(&ca, &ca.issue(B)).await;
    let peer = dial(addr, &ca.issue(A), ca.roots(), B).await.unwrap();
    let tunnel = peer.connect("10.0.0.2:8080".parse::<SocketAddr>().unwrap()).await.unwrap();
    let io = TunnelIo::new(tunnel, Bytes::new());
    let payload: Vec<u8> = (0..(5u32 << 20)).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(io);
    let send = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let (_, n) = tokio::join!(send, r.read_to_end(&mut back));
    assert_eq!(n.unwrap(), payload.len());
    assert!(back == payload, "echoed bytes differ");

    // Bytes a caller took before (a protocol sniff) come first.
    let tunnel = peer.connect("10.0.0.2:8080".parse::<SocketAddr>().unwrap()).await.unwrap();
    let mut io = TunnelIo::new(tunnel, Bytes::from_static(b"sniffed "));
    io.write_all(b"rest").await.unwrap();
    io.shutdown().await.unwrap();
    let mut got = Vec::new();
    io.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"sniffed rest");
}

#[tokio::test]
async fn handshakes_refuse_the_wrong_identities() {
    let ca = Ca::new();
    let (addr, _) = start(&ca, &ca.issue(B)).await;
    let a = ca.issue(A);

    // The server is not who the destination workload should be.
    let err = dial(addr, &a, ca.roots(), "spiffe://cluster.local/ns/shop/sa/c").await.err().unwrap();
    assert!(err.to_string().contains("server presented spiffe://cluster.local/ns/shop/sa/b"), "{err}");

    // A client of another trust domain, from the same CA.
    let foreign = ca.issue("spiffe://evil.org/ns/shop/sa/a");
    assert!(refused(addr, &foreign, ca.roots()).await, "foreign trust domain accepted");

    // An expired client certificate.
    let now = OffsetDateTime::now_utc();
    let expired = ca.issue_valid(A, now - Duration::from_secs(7200), now - Duration::from_secs(3600));
    assert!(refused(addr, &expired, ca.roots()).await, "expired certificate accepted");

    // A client certificate from another CA (it trusts the real server's root).
    let forged = Ca::new().issue(A);
    assert!(refused(addr, &forged, ca.roots()).await, "forged certificate accepted");

    // The server's certificate from another CA.
    let other = Ca::new();
    let (other_addr, _) = start(&other, &other.issue(B)).await;
    assert!(dial(other_addr, &a, ca.roots(), B).await.is_err(), "server from another CA accepted");
}

/// A certificate the controller revoked is refused by either end at the
/// handshake, once the revocation is in force, and by nothing before it.
#[tokio::test]
async fn revoked_certificates_fail_the_handshake() {
    let ca = Ca::new();
    let (a, b) = (ca.issue(A), ca.issue(B));
    let revoked: Arc<Revocations> = Arc::default();
    let config = Arc::new(server_config(&b, ca.roots(), revoked.clone(), "cluster.local").unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = Arc::new(Echo::new(echo_server().await));
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, h) = (config.clone(), handler.clone());
            tokio::spawn(async move {
                if let Err(e) = serve(tcp, config, h, std::future::pending(), HANDSHAKE_TIMEOUT).await {
                    assert_eq!(failure_reason(&e), "revoked", "{e}");
                }
            });
        }
    });
    let client = |me: &Credentials| {
        let config = client_config(me, ca.roots(), revoked.clone(), B.parse().unwrap()).unwrap();
        async move {
            let peer = PeerConnection::handshake(TcpStream::connect(addr).await?, Arc::new(config)).await?;
            peer.connect("10.0.0.2:8080".parse::<SocketAddr>().unwrap())
                .await
                .map_err(|e| io::Error::other(e.to_string()))
        }
    };
    assert!(client(&a).await.is_ok(), "nothing revoked yet");

    let serial = |c: &Credentials| serial_of(&c.chain[0]);
    revoked.replace([(serial(&a), "node1".to_string())].into());
    assert_eq!(revoked.revoked_by(&serial(&a)).as_deref(), Some("node1"));
    assert!(client(&a).await.is_err(), "the server took a revoked client certificate");
    let a2 = ca.issue(A);
    assert!(client(&a2).await.is_ok(), "another certificate of the same identity is fine");

    revoked.replace([(serial(&b), "node2".to_string())].into());
    let err = client(&a).await.err().expect("the client took a revoked server certificate");
    assert!(err.to_string().to_lowercase().contains("revoked"), "{err}");
}

/// With TLS 1.3 the client finishes its handshake before the server judges
/// its certificate: the refusal shows on the first use of the connection.
async fn refused(addr: SocketAddr, me: &Credentials, roots: Arc<RootCertStore>) -> bool {
    match dial(addr, me, roots, B).await {
        Err(_) => true,
        Ok(peer) => {
            tokio::time::timeout(Duration::from_secs(5), peer.connect("10.0.0.2:8080".parse::<SocketAddr>().unwrap()))
                .await
                .map(|r| r.is_err())
                .unwrap_or(true)
        }
    }
}

/// An HBONE server whose connections can all be cut at once (a peer's
/// restart), forwarding to `echo`.
struct Restartable {
    accept: tokio::task::JoinHandle<()>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Restartable {
    async fn start(listener: TcpListener, ca: &Ca, server: &Credentials, echo: SocketAddr) -> Restartable {
        let handler = Arc::new(Echo::new(echo));
        let config = Arc::new(server_config(server, ca.roots(), Arc::default(), "cluster.local").unwrap());
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let held = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (config, h) = (config.clone(), handler.clone());
                let task =
                    tokio::spawn(async move { serve(tcp, config, h, std::future::pending(), HANDSHAKE_TIMEOUT).await });
                held.lock().unwrap().push(task.abort_handle());
            }
        });
        Restartable { accept, conns }
    }

    /// Stops listening and cuts every connection.
    fn kill(self) {
        self.accept.abort();
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

/// The pool heals itself: 150 tunnels opened at once to one peer share
/// their dials (two connections of 100 streams, not 150 handshakes); after
/// the peer restarts, its dead connection leaves the pool and no tunnel is
/// tried on it first.
#[tokio::test]
async fn the_pool_shares_dials_and_forgets_dead_connections() {
    use crate::pool::Pool;
    let ca = Ca::new();
    let echo_addr = echo_server().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = ca.issue(B);
    let peer = Restartable::start(listener, &ca, &server, echo_addr).await;
    let (me, roots) = (ca.issue(A), ca.roots());
    let key = pool_key(addr);
    let pool = Arc::new(Pool::spreading_over(2));
    let target: SocketAddr = "10.0.0.2:8080".parse().unwrap();
    let dial = dialer(addr, &me, roots.clone(), B);
    let open = || pool.tunnel(&key, 0, target, &dial);

    let mut opening = Vec::new();
    for _ in 0..150 {
        opening.push(open());
    }
    let tunnels: Vec<_> = futures_util::future::join_all(opening).await;
    assert!(tunnels.iter().all(Result::is_ok), "every tunnel opened");
    let (pooled, dialed) = pool.stats();
    assert_eq!((pooled, dialed), (2, 2), "150 tunnels over two shared dials");
    drop(tunnels);

    // The peer restarts on the same address: the pooled connections' drivers end.
    peer.kill();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let listener = TcpListener::bind(addr).await.unwrap();
    let _peer = Restartable::start(listener, &ca, &server, echo_addr).await;
    let (tunnel, _slot) = open().await.expect("a tunnel after the restart");
    drop(tunnel);
    assert_eq!(pool.broken_attempts(), 0, "no tunnel was tried on a dead connection");
    assert_eq!(pool.stats(), (1, 3), "the dead ones left the pool; one fresh dial");
}

/// A thousand tunnels opened at once to one peer need ten connections of 100
/// streams, and that is about what they make: each dial is shared by as many
/// tunnels as it has room for, and more start beside it. (Dials shared
/// without a limit had made a handshake each for most tunnels after the
/// third: 93 connections for 1000 idle tunnels in the bench, 35 KiB of
/// buffers each on both nodes.)
#[tokio::test]
async fn a_burst_of_tunnels_makes_only_the_connections_it_needs() {
    let (pool, key, target, dial) = pool_to_a_peer().await;
    let opening: Vec<_> = (0..1000).map(|_| pool.tunnel(&key, 0, target, &dial)).collect();
    let tunnels = futures_util::future::join_all(opening).await;
    assert!(tunnels.iter().all(Result::is_ok), "every tunnel opened");
    let (pooled, dialed) = pool.stats();
    // Ten full ones, and a spare the spread may have started.
    assert!((10..=12).contains(&dialed), "{dialed} connections dialed for 1000 tunnels");
    assert_eq!(pooled, dialed);
}

/// A client that connects to 15008 and stalls, silent or sending TLS a byte
/// at a time, is cut off at the handshake timeout (paused time: at once).
#[tokio::test(start_paused = true)]
async fn stalled_handshakes_are_cut_off() {
    let ca = Ca::new();
    let config = Arc::new(server_config(&ca.issue(B), ca.roots(), Arc::default(), "cluster.local").unwrap());
    let handler = Arc::new(Echo::new("127.0.0.1:1".parse().unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    for slowloris in [false, true] {
        let mut client = TcpStream::connect(addr).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let serving =
            tokio::spawn(serve(tcp, config.clone(), handler.clone(), std::future::pending(), HANDSHAKE_TIMEOUT));
        if slowloris {
            tokio::spawn(async move {
                // A TLS record header, then one byte every second.
                let _ = client.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
                while client.write_all(&[0x01]).await.is_ok() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            });
        } else {
            std::mem::forget(client);
        }
        let started = tokio::time::Instant::now();
        let e = serving.await.unwrap().expect_err("a stalled handshake fails");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert_eq!(started.elapsed().as_secs(), HANDSHAKE_TIMEOUT.as_secs(), "slowloris: {slowloris}");
    }
}

/// A pool spreading over two connections, with the key, a tunnel target
/// and the dialer of tunnels from A to a running B.
async fn pool_to_a_peer() -> (
    Arc<crate::pool::Pool>,
    crate::pool::PoolKey,
    SocketAddr,
    impl Fn() -> futures_util::future::BoxFuture<'static, io::Result<PeerConnection>>,
) {
    let ca = Ca::new();
    let (addr, _) = start(&ca, &ca.issue(B)).await;
    let pool = Arc::new(crate::pool::Pool::spreading_over(2));
    let dial = dialer(addr, &ca.issue(A), ca.roots(), B);
    (pool, pool_key(addr), "10.0.0.2:8080".parse().unwrap(), dial)
}

/// The pool key of tunnels from A (on loopback) to B at `addr`.
fn pool_key(addr: SocketAddr) -> crate::pool::PoolKey {
    crate::pool::PoolKey {
        src: A.parse().unwrap(),
        src_ip: "127.0.0.1".parse().unwrap(),
        dst: B.parse().unwrap(),
        dst_ip: addr.ip(),
    }
}

/// Echoes `n` bytes through `tunnel` and checks they come back.
async fn echo_through(tunnel: Tunnel, n: usize) {
    let (mut app, proxy_side) = tokio::io::duplex(1 << 16);
    let relay = tokio::spawn(relay(proxy_side, tunnel));
    let payload = vec![7u8; n];
    app.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; n];
    app.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
    app.shutdown().await.unwrap();
    drop(app);
    relay.await.unwrap().unwrap();
}

/// A renewed certificate moves new tunnels to a connection dialed with it;
/// a tunnel in flight on the old connection runs on, and the old connection
/// is dropped once it carries none.
#[tokio::test]
async fn the_pool_moves_to_a_renewed_certificate() {
    use crate::pool::Pool;
    let ca = Ca::new();
    let (addr, _) = start(&ca, &ca.issue(B)).await;
    let (old, new) = (ca.issue(A), ca.issue(A));
    let key = pool_key(addr);
    let pool = Arc::new(Pool::spreading_over(2));
    let target: SocketAddr = "10.0.0.2:8080".parse().unwrap();
    let (dial_old, dial_new) = (dialer(addr, &old, ca.roots(), B), dialer(addr, &new, ca.roots(), B));
    let (in_flight, slot) = pool.tunnel(&key, 1, target, &dial_old).await.unwrap();
    let (renewed, slot2) = pool.tunnel(&key, 2, target, &dial_new).await.unwrap();
    assert_eq!(pool.stats(), (2, 2), "a second connection, dialed with the renewed certificate");
    echo_through(in_flight, 100_000).await;
    drop(slot);
    echo_through(renewed, 100_000).await;
    drop(slot2);
    let (again, _slot) = pool.tunnel(&key, 2, target, &dial_new).await.unwrap();
    echo_through(again, 10).await;
    assert_eq!(pool.stats(), (1, 2), "the old connection is gone; the renewed one was reused");
}

/// Parallel tunnels to one peer are spread over a connection per core: the
/// second tunnel goes on the busy first connection at once while a spare is
/// dialed beside it, the third on the spare; past the spread they share.
#[tokio::test]
async fn the_pool_spreads_busy_tunnels_over_connections() {
    let (pool, key, target, dial) = pool_to_a_peer().await;
    let first = pool.tunnel(&key, 0, target, &dial).await.unwrap();
    assert_eq!(pool.stats(), (1, 1));
    let second = pool.tunnel(&key, 0, target, &dial).await.unwrap();
    for _ in 0..200 {
        if pool.stats() == (2, 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(pool.stats(), (2, 2), "a spare connection was dialed in the background");
    let more: Vec<_> = futures_util::future::join_all((0..4).map(|_| pool.tunnel(&key, 0, target, &dial))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(pool.stats(), (2, 2), "no more than two connections: tunnels share them");
    for (tunnel, _slot) in [first, second].into_iter().chain(more.into_iter().map(Result::unwrap)) {
        echo_through(tunnel, 1000).await;
    }
}

#[test]
fn failure_reasons() {
    use rustls::{CertificateError as C, Error as E};
    let tls = |e: E| io::Error::new(io::ErrorKind::InvalidData, e);
    let cases = [
        (io::Error::new(io::ErrorKind::TimedOut, "TLS handshake not done within 10s"), "handshake_timeout"),
        (tls(E::InvalidCertificate(C::Expired)), "expired"),
        (tls(E::InvalidCertificate(C::NotValidYet)), "not_yet_valid"),
        (tls(E::InvalidCertificate(C::UnknownIssuer)), "unknown_issuer"),
        (tls(E::InvalidCertificate(C::BadSignature)), "bad_signature"),
        (tls(E::InvalidCertificate(C::Revoked)), "revoked"),
        (tls(E::InvalidCertificate(C::UnhandledCriticalExtension)), "bad_certificate"),
        (tls(E::NoCertificatesPresented), "no_client_certificate"),
        (
            tls(E::General("client spiffe://evil.org/ns/a/sa/b is not in trust domain cluster.local".into())),
            "foreign_trust_domain",
        ),
        (tls(E::General("certificate without a URI SAN".into())), "bad_identity"),
        (tls(E::HandshakeNotComplete), "tls"),
        (io::Error::other("h2 protocol error"), "other"),
    ];
    for (e, want) in cases {
        assert_eq!(failure_reason(&e), want, "{e}");
    }
}

/// A client's transport that stops reading when told (writes go on).
struct StopReading {
    io: tokio::io::DuplexStream,
    stopped: Arc<std::sync::atomic::AtomicBool>,
}

impl AsyncRead for StopReading {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if self.stopped.load(std::sync::atomic::Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for StopReading {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Accepts every tunnel and sends into it as fast as flow control lets it,
/// counting what h2 took.
struct Flood(Arc<std::sync::atomic::AtomicUsize>);

impl TunnelHandler for Flood {
    async fn handle(&self, request: TunnelRequest) {
        let Ok(Tunnel { mut send, recv: _recv }) = request.accept() else { return };
        loop {
            send.reserve_capacity(crate::relay::MAX_READ);
            let Some(Ok(n)) = std::future::poll_fn(|cx| send.poll_capacity(cx)).await else { return };
            if send.send_data(Bytes::from(vec![0u8; n]), false).is_err() {
                return;
            }
            self.0.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// An HTTP/2 client that opens a tunnel, advertises a 16 MiB window and
/// then never reads: the server's memory for it stays bounded by h2's send
/// buffer, and the connection is cut off when its keepalive PING goes
/// unanswered (paused time: at once).
#[tokio::test(start_paused = true)]
async fn a_client_that_never_reads_is_cut_off() {
    let (client_io, server_io) = tokio::io::duplex(64 << 10);
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peer = Peer { identity: A.parse().unwrap(), serial: "01".into() };
    let far = tokio::time::Instant::now() + Duration::from_secs(3600);
    let serving = tokio::spawn(serve_streams(
        server_io,
        peer,
        "10.0.0.1:1000".parse().unwrap(),
        Arc::new(Flood(sent.clone())),
        std::future::pending(),
        far,
    ));
    let client_io = StopReading { io: client_io, stopped: stopped.clone() };
    let (sender, connection) = h2::client::Builder::new()
        .initial_window_size(16 << 20)
        .initial_connection_window_size(16 << 20)
        .handshake::<_, Bytes>(client_io)
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder().method(Method::CONNECT).uri("10.0.0.2:80").body(()).unwrap();
    let (response, _send) = sender.ready().await.unwrap().send_request(request, false).unwrap();
    assert_eq!(response.await.unwrap().status(), StatusCode::OK);
    stopped.store(true, std::sync::atomic::Ordering::Relaxed);
    let before = sent.load(std::sync::atomic::Ordering::Relaxed);

    let started = tokio::time::Instant::now();
    let limit = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT;
    let served = tokio::time::timeout(limit + Duration::from_secs(1), serving).await;
    let err = served.expect("not cut off in time").unwrap().expect_err("the connection must end");
    assert_eq!(failure_reason(&err), "keepalive_timeout", "{err}");
    let held = sent.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(held < 1 << 20, "{held} bytes taken for a client that reads nothing: its window was 16 MiB");
    eprintln!("{held} bytes taken after the client stopped reading; cut off after {:?}", started.elapsed());
}
