//! Wiring: the shared [`AppState`], the router ([`app`]) and [`Server::run`], which serves a listener
//! until a shutdown signal and then drains connections and flushes pending writes.

use crate::config::Config;
use crate::directory::Directory;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::ratelimit::RateLimits;
use crate::storage::{Store, StoreError};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::handler::Handler;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodFilter, MethodRouter};
use axum::Router;
use parley_spec::endpoint::{Endpoint, Method};
use parley_spec::{ServerName, Timestamp};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Everything a handler needs: one shared allocation, so a clone is one reference count (each
/// WebSocket's task holds one, and axum clones it for every request). Its fields are read
/// through `Deref`.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] shares.
pub(crate) struct Shared {
    pub config: Arc<Config>,
    /// This server's name (`config.server_name`).
    pub server_name: ServerName,
    pub store: Arc<Store>,
    /// Live connections.
    pub hub: Arc<Hub>,
    /// Each local user's devices, cached.
    pub directory: Arc<Directory>,
    /// Online counts.
    pub presence: Arc<Presence>,
    pub limits: Arc<RateLimits>,
    /// Bytes queued for WebSocket clients, server-wide.
    pub outgoing: Arc<crate::outgoing::OutgoingBudget>,
    /// Password hashing, bounded in memory.
    pub passwords: Arc<crate::auth::Passwords>,
    pub metrics: Metrics,
    /// Becomes true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// This server's signing key (federation), kept in `Config::server_key_file`.
    pub server_key: Arc<parley_federation::ServerKey>,
    /// Federation (None when disabled).
    pub federation: Option<Arc<crate::federation::Federation>>,
    /// MLS groups: the hub's groups in memory, group acknowledgements.
    pub groups: Arc<crate::groups::Groups>,
    /// The media store.
    pub media: Arc<crate::media::Media>,
    /// Push wake-ups.
    pub push: Arc<crate::push::Push>,
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The data directory cannot be created.
    #[error("data directory: {0}")]
    DataDir(std::io::Error),
    /// The server signing key cannot be loaded or created.
    #[error(transparent)]
    ServerKey(#[from] parley_federation::ServerKeyError),
    /// The database cannot be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The federation listener's certificate or key, or the extra CA file, cannot be used.
    #[error("federation TLS: {0}")]
    Tls(#[from] parley_federation::tls::TlsError),
    /// Discovery or the federation HTTP client cannot be set up.
    #[error("federation: {0}")]
    Federation(String),
    /// The media store cannot be opened.
    #[error("{0}")]
    Media(String),
    /// The push client cannot be set up (its extra CA file, say).
    #[error("push: {0}")]
    Push(String),
    /// Another parleyd runs on the data directory.
    #[error(transparent)]
    Locked(#[from] crate::storage::LockError),
    /// The other workers cannot be reached.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

/// A running server's handles that [`Server::run`] needs to shut down cleanly.
pub struct Server {
    /// The state shared by handlers.
    pub(crate) state: AppState,
    writer: tokio::task::JoinHandle<()>,
    shutdown_tx: watch::Sender<bool>,
    tls: Option<Arc<rustls::ServerConfig>>,
    /// The data directory's lock, held while the server lives.
    _lock: std::fs::File,
}

impl Server {
    /// Opens storage and builds the state.
    pub async fn open(config: Config) -> Result<Self, OpenError> {
        crate::storage::create_data_dir(&config.data_dir).map_err(OpenError::DataDir)?;
        let lock = crate::storage::lock_data_dir(&config.data_dir)?;
        let server_name = config.server_name.clone();
        let metrics = Metrics::new();
        let hub = Arc::new(Hub::default());
        let server_key = Arc::new(parley_federation::ServerKey::load_or_create(&config.server_key_path())?);
        let media = Arc::new(
            crate::media::Media::open(&config, &server_key, metrics.clone()).map_err(|e| OpenError::Media(e.to_string()))?,
        );
        // The writer publishes each commit: its events to the hub (inline), the outbound queues
        // it grew on a channel whose receiver the federation sender takes below.
        let (outbound_tx, outbound_rx) = tokio::sync::mpsc::unbounded_channel();
        let subscribers = crate::storage::Subscribers {
            events: Some(hub.clone() as Arc<dyn crate::storage::LiveEvents>),
            outbound: config.federation.enabled.then_some(outbound_tx),
        };
        let (store, writer) = Store::open(&config, metrics.clone(), subscribers).await?;
        let store = Arc::new(store);
        let (shutdown_tx, shutdown) = watch::channel(false);
        let push =
            crate::push::start(store.clone(), config.push.clone(), metrics.clone(), shutdown.clone(), &server_name, &server_key)
                .await
                .map_err(OpenError::Push)?;
        hub.set_push(push.clone());
        if let Some(url) = &config.cluster.nats_url {
            let cluster = crate::cluster::Cluster::connect(url, config.subject_prefix(), &hub).await?;
            let (store, push, allow_private) = (store.clone(), push.clone(), config.push.allow_private_addresses);
            cluster.on_pusher_changed(move |device| {
                let (store, push) = (store.clone(), push.clone());
                tokio::spawn(async move { push.reload(&store, device, allow_private).await });
            });
            hub.set_relay(cluster);
        }
        let (federation, tls) = if config.federation.enabled {
            let fed = &config.federation;
            let (Some(cert), Some(key)) = (&fed.tls_cert, &fed.tls_key) else {
                return Err(OpenError::Federation("federation.tls_cert and federation.tls_key are required".into()));
            };
            let tls = parley_federation::tls::server_config(cert, key)?;
            let extra_roots = match &fed.extra_ca_file {
                Some(path) => parley_federation::tls::extra_roots(path)?,
                None => Vec::new(),
            };
            let timeout = Duration::from_millis(fed.request_timeout_ms);
            let discovery = parley_federation::discovery::Discovery::new(parley_federation::discovery::DiscoveryConfig {
                nameservers: fed.nameservers.clone(),
                well_known_port: fed.well_known_port,
                default_port: fed.default_port,
                timeout: timeout.min(Duration::from_secs(10)),
                extra_roots,
            })
            .map_err(|e| OpenError::Federation(e.to_string()))?;
            let client = parley_federation::transport::FederationClient::new(
                server_name.clone(),
                server_key.clone(),
                discovery,
                timeout,
                fed.max_requests_per_destination,
            )
            .map_err(|e| OpenError::Federation(e.to_string()))?;
            let prefix = server_key.key_id.trim_start_matches("ed25519:").to_owned();
            let sender = crate::federation::sender::Sender::start(
                store.clone(),
                outbound_rx,
                client.clone(),
                fed.clone(),
                metrics.clone(),
                prefix,
                shutdown.clone(),
            )
            .await?;
            if let Some(cluster) = hub.relay() {
                sender.join_cluster(cluster.clone());
            }
            (Some(Arc::new(crate::federation::Federation::new(fed.clone(), client, sender))), Some(tls))
        } else {
            (None, None)
        };
        let (groups, group_acks) = crate::groups::Groups::new();
        tokio::spawn(crate::groups::flush_acks(
            store.clone(),
            group_acks,
            Duration::from_millis(config.limits.group_ack_interval_ms),
        ));
        let state = AppState(Arc::new(Shared {
            groups: Arc::new(groups),
            media,
            push,
            directory: Arc::new(Directory::new(store.clone(), server_name.clone())),
            limits: Arc::new(RateLimits::new(&config.rate_limits)),
            outgoing: Arc::new(crate::outgoing::OutgoingBudget::new(config.limits.ws_unsent_bytes_total)),
            passwords: Arc::new(crate::auth::Passwords::new(&config.auth)),
            config: Arc::new(config),
            server_name,
            store,
            hub,
            presence: Arc::new(Presence::default()),
            metrics,
            shutdown,
            server_key,
            federation,
        }));
        Ok(Self { state, writer, shutdown_tx, tls, _lock: lock })
    }

    /// Serves `listener` until `signal` completes, then closes every WebSocket (1001), waits
    /// for in-flight requests, and lets the writer commit everything queued before returning.
    pub async fn run(
        self,
        listener: TcpListener,
        federation_listener: Option<TcpListener>,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Server { state, writer, shutdown_tx, tls, _lock } = self;
        tokio::spawn(crate::groups::flush_receipts(state.clone()));
        let sweeper = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    state.limits.shrink();
                    if let Some(fed) = &state.federation {
                        fed.shrink();
                        let before =
                            Timestamp::now().saturating_sub(Duration::from_millis(state.config.federation.txn_retention_ms));
                        if let Err(error) = state.store.prune_inbound(before).await {
                            tracing::warn!(%error, "pruning inbound transaction and message ids failed");
                        }
                    }
                }
            })
        };
        let media_sweeper = {
            let state = state.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_millis(state.config.media.sweep_interval_ms));
                loop {
                    tick.tick().await;
                    if let Err(error) = state.media.sweep(&state.store).await {
                        tracing::warn!(%error, "sweeping media failed");
                    }
                }
            })
        };
        let federation_task = match (federation_listener, tls) {
            (Some(listener), Some(tls)) => Some(tokio::spawn(serve_tls(
                listener,
                tls,
                crate::federation::inbound::router(state.clone()),
                state.metrics.clone(),
                state.shutdown.clone(),
            ))),
            _ => None,
        };
        let router = app(state.clone());
        let mut shutdown = state.shutdown.clone();
        // Small frames must leave at once: without TCP_NODELAY, Nagle's algorithm and the
        // peer's delayed ACKs add ~40 ms to a live event.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::warn!(%error, "could not set TCP_NODELAY");
            }
        });
        let serve = axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>()).with_graceful_shutdown(
            async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            },
        );
        let trigger = tokio::spawn(async move {
            signal.await;
            tracing::info!("shutting down: closing connections and flushing writes");
            let _ = shutdown_tx.send(true);
        });
        let result = serve.await;
        trigger.abort();
        sweeper.abort();
        media_sweeper.abort();
        if let Some(task) = federation_task {
            let _ = task.await;
        }
        // Every connection task holds a clone of the state; once they are gone the writer's
        // queue closes, and the writer commits what is left and stops.
        drop(state);
        if tokio::time::timeout(Duration::from_secs(30), writer).await.is_err() {
            tracing::error!("writer did not finish within 30 s");
        }
        result
    }
}

/// A route for the endpoint `E`: its method from its definition in `parley-spec` (its path is
/// `E::PATH`), served by `handler`.
pub(crate) fn on<E: Endpoint, H, T, S>(_: E, handler: H) -> MethodRouter<S>
where
    H: Handler<T, S>,
    T: 'static,
    S: Clone + Send + Sync + 'static,
{
    let filter = match E::METHOD {
        Method::Get => MethodFilter::GET,
        Method::Post => MethodFilter::POST,
        Method::Put => MethodFilter::PUT,
        Method::Delete => MethodFilter::DELETE,
    };
    axum::routing::on(filter, handler)
}

/// The router of the client API.
pub(crate) fn app(state: AppState) -> Router {
    use crate::api;
    use parley_spec::federation::v1::keys::GetServerKeys;
    use parley_spec::v1::account::{Login, Logout, Register, WhoAmI};
    use parley_spec::v1::devices::{DeleteDevice, ListDevices, UserDevices};
    use parley_spec::v1::groups::{CreateGroup, GroupEvents, GroupSend, ListGroups};
    use parley_spec::v1::keypackages::{ClaimKeyPackages, UploadKeyPackages};
    use parley_spec::v1::keys::{ClaimKeys, GetDeviceList, PutDeviceList, UploadKeys};
    use parley_spec::v1::media::{CompleteUpload, CreateUpload, DownloadMedia, GetMediaConfig, GetUpload, PutUploadPart};
    use parley_spec::v1::messages::{MarkRead, SendMessage};
    use parley_spec::v1::presence::{GetPresence, ListSubscriptions, SetPrivacy, SubscribePresence};
    use parley_spec::v1::push::{DeletePusher, GetPusher, GetVapidKey, SetPusher};
    use parley_spec::v1::sync::SyncEvents;
    use parley_spec::v1::ws::WebSocket;
    let send_limit = state.config.limits.max_send_bytes();
    let group_limit = state.config.limits.max_group_send_bytes();
    let body_limit = state.config.limits.max_request_bytes;
    Router::new()
        .route(Register::PATH, on(Register, api::account::register))
        .route(Login::PATH, on(Login, api::account::login))
        .route(Logout::PATH, on(Logout, api::account::logout))
        .route(WhoAmI::PATH, on(WhoAmI, api::account::whoami))
        .route(ListDevices::PATH, on(ListDevices, api::account::list_devices))
        .route(DeleteDevice::PATH, on(DeleteDevice, api::account::delete_device))
        .route(UserDevices::PATH, on(UserDevices, api::account::user_devices))
        .route(SendMessage::PATH, on(SendMessage, api::messages::send_message).layer(DefaultBodyLimit::max(send_limit)))
        .route(MarkRead::PATH, on(MarkRead, api::messages::mark_read))
        .route(SyncEvents::PATH, on(SyncEvents, api::messages::sync))
        .route(SubscribePresence::PATH, on(SubscribePresence, api::presence::subscribe))
        .route(ListSubscriptions::PATH, on(ListSubscriptions, api::presence::list_subscriptions))
        .route(GetPresence::PATH, on(GetPresence, api::presence::get_presence))
        .route(SetPrivacy::PATH, on(SetPrivacy, api::presence::set_privacy))
        .route(UploadKeys::PATH, on(UploadKeys, api::keys::upload_keys))
        .route(PutDeviceList::PATH, on(PutDeviceList, api::keys::put_device_list))
        .route(ClaimKeys::PATH, on(ClaimKeys, api::keys::claim_keys))
        .route(GetDeviceList::PATH, on(GetDeviceList, api::keys::get_device_list))
        .route(UploadKeyPackages::PATH, on(UploadKeyPackages, api::keypackages::upload_keypackages))
        .route(ClaimKeyPackages::PATH, on(ClaimKeyPackages, api::keypackages::claim_keypackages))
        .route(CreateGroup::PATH, on(CreateGroup, api::groups::create_group).layer(DefaultBodyLimit::max(group_limit)))
        .route(GroupSend::PATH, on(GroupSend, api::groups::group_send).layer(DefaultBodyLimit::max(group_limit)))
        .route(GroupEvents::PATH, on(GroupEvents, api::groups::group_events))
        .route(ListGroups::PATH, on(ListGroups, api::groups::list_groups))
        .route(WebSocket::PATH, on(WebSocket, crate::ws::upgrade))
        .route(GetMediaConfig::PATH, on(GetMediaConfig, api::media::get_config))
        .route(CreateUpload::PATH, on(CreateUpload, api::media::create_upload))
        .route(GetUpload::PATH, on(GetUpload, api::media::get_upload))
        // The body is streamed to the store and its length checked against the part's there.
        .route(PutUploadPart::PATH, on(PutUploadPart, api::media::put_part).layer(DefaultBodyLimit::disable()))
        .route(CompleteUpload::PATH, on(CompleteUpload, api::media::complete_upload))
        .route(DownloadMedia::PATH, on(DownloadMedia, api::media::download))
        .route(SetPusher::PATH, on(SetPusher, api::push::set_pusher))
        .route(GetPusher::PATH, on(GetPusher, api::push::get_pusher))
        .route(DeletePusher::PATH, on(DeletePusher, api::push::delete_pusher))
        .route(GetVapidKey::PATH, on(GetVapidKey, api::push::get_vapid_key))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limit_ip))
        .route(GetServerKeys::PATH, on(GetServerKeys, server_keys))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(|| async { crate::error::Error::new(parley_spec::ErrorCode::NotFound, "no such endpoint") })
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| crate::error::response(crate::error::internal_body())))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(|request: &Request| {
            // The path only: queries may hold an access token.
            tracing::info_span!("http", method = %request.method(), path = %request.uri().path())
        }))
        .with_state(state)
}

/// The per-IP limit of the client API. A request with a token is counted later, by
/// [`AuthDevice`](crate::auth::AuthDevice) after its account and device limits, so one account
/// refused by its own limits does not use up an address shared by a whole office (NAT).
/// Register and login do not authenticate; their stricter per-IP limit applies instead.
async fn limit_ip(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    if crate::auth::has_token(request.headers(), request.uri()) {
        request.extensions_mut().insert(crate::auth::PendingIpLimit(peer.ip()));
        return next.run(request).await;
    }
    match state.limits.check_ip(peer.ip(), &state.metrics) {
        Ok(()) => next.run(request).await,
        Err(error) => error.into_response(),
    }
}

/// Serves the federation router over TLS until shutdown.
async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: Router,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "federation accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let router = router.clone();
        let builder = builder.clone();
        let mut shutdown = shutdown.clone();
        let accepted = metrics.federation_connections_accepted.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => {
                    accepted.inc();
                    stream
                }
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "federation TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            // Handlers see the peer's address (for the per-IP limit on failed authentication).
            let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(router.clone(), request)
            });
            let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            let stopping = async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            };
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(error) = result {
                        tracing::debug!(%peer, %error, "federation connection ended with an error");
                    }
                    return;
                }
                _ = stopping => {}
            }
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(10), connection).await;
        });
    }
}

/// GET /_parley/key/v1: this server's signing keys, self-signed, valid for a day.
pub(crate) async fn server_keys(State(state): State<AppState>) -> axum::Json<parley_spec::federation::v1::keys::ServerKeys> {
    const VALID_FOR_MS: u64 = 24 * 60 * 60 * 1000;
    axum::Json(parley_federation::sign_server_keys(&state.server_name, &state.server_key, Timestamp::now(), VALID_FOR_MS))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.render())
}
