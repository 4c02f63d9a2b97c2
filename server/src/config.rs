//! Configuration: one typed [`Config`], layered defaults → TOML file → environment
//! (`PARLEY__SECTION__KEY`) → command-line flags, then checked. `parleyd` starts with no file
//! at all. `server/parleyd.example.toml` documents every key; a test keeps it current.

use figment::providers::{Env, Format as _, Serialized, Toml};
use figment::Figment;
use parley_spec::federation::v1::transaction::MAX_TXN_ITEMS;
use parley_spec::ServerName;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole server configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This server's name: the part after `:` in its user ids.
    pub server_name: ServerName,
    /// Address of the client API (HTTP and WebSocket).
    pub listen: SocketAddr,
    /// Where the database, the server key and media live.
    pub data_dir: PathBuf,
    /// The server's signing key (federation signatures; media URL and push keys derive from
    /// it), relative to `data_dir` unless absolute; made when missing. The workers of one
    /// homeserver must all read the same key.
    pub server_key_file: PathBuf,
    /// Who may register.
    pub registration: RegistrationConfig,
    /// Password hashing.
    pub auth: AuthConfig,
    /// Sizes and counts.
    pub limits: LimitsConfig,
    /// Rate limits.
    pub rate_limits: RateLimitConfig,
    /// Presence and heartbeats.
    pub presence: PresenceConfig,
    /// Storage.
    pub storage: StorageConfig,
    /// Logging.
    pub log: LogConfig,
    /// Threads.
    pub runtime: RuntimeConfig,
    /// Talking to other homeservers.
    pub federation: FederationConfig,
    /// Attachments: where they are stored, limits, lifetimes.
    pub media: MediaConfig,
    /// Push wake-ups for devices without a live connection.
    pub push: PushConfig,
    /// Several workers of this homeserver (one PostgreSQL database, NATS between them).
    pub cluster: ClusterConfig,
}

/// Several `parleyd` workers serving one homeserver: they share the PostgreSQL database
/// (`storage.database_url`) and pass live traffic (events, typing, presence, group messages)
/// to each other over NATS; the database stays the source of truth.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The NATS server(s) the workers share, comma-separated (`nats://10.0.0.5:4222`); unset:
    /// this process serves alone.
    pub nats_url: Option<String>,
    /// First token of every subject this homeserver uses; empty: `parley_` and the server
    /// name with its dots as underscores (workers of one homeserver must agree on it; other
    /// homeservers on the same NATS must not).
    pub subject_prefix: String,
}

/// Registration settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// `open`, `closed` (admin creates users), or `token` (a registration token is needed).
    pub mode: RegistrationMode,
}

/// Who may register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegistrationMode {
    /// Anyone.
    Open,
    /// No one; `parleyd admin create-user` only.
    Closed,
    /// Whoever has a token from `parleyd admin create-registration-token`.
    Token,
}

/// argon2id cost parameters for password hashes, and how many hashes may run at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Memory cost in KiB (OWASP: 19456).
    pub argon2_memory_kib: u32,
    /// Iterations.
    pub argon2_iterations: u32,
    /// Parallelism.
    pub argon2_parallelism: u32,
    /// Shortest accepted password, in bytes.
    pub min_password_bytes: usize,
    /// Password hashes computed at once (each holds `argon2_memory_kib` of memory); 0: one per
    /// CPU core.
    pub hash_concurrency: usize,
    /// Requests waiting for a hash slot; more are refused at once with `server_busy`.
    pub hash_queue: usize,
    /// Longest wait for a hash slot before `server_busy`, in milliseconds.
    pub hash_queue_timeout_ms: u64,
}

impl AuthConfig {
    /// Hashes computed at once: `hash_concurrency`, or the number of CPU cores when 0.
    pub fn hash_slots(&self) -> usize {
        match self.hash_concurrency {
            0 => std::thread::available_parallelism().map(usize::from).unwrap_or(2),
            n => n,
        }
    }
}

/// Size and count limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest ciphertext of one envelope (decoded bytes). 256 KiB fits 100,000 characters.
    pub max_envelope_bytes: usize,
    /// Most devices per user.
    pub max_devices_per_user: usize,
    /// Largest HTTP request body.
    pub max_request_bytes: usize,
    /// Most events in one sync answer or backlog page.
    pub sync_page: u32,
    /// Longest long-poll wait, in milliseconds.
    pub max_sync_timeout_ms: u64,
    /// Live events buffered per connection before it falls back to reading its inbox.
    pub connection_buffer: usize,
    /// WebSocket read buffer per connection, in bytes (kept small: most connections idle).
    pub ws_read_buffer_bytes: usize,
    /// WebSocket write buffer per connection, in bytes.
    pub ws_write_buffer_bytes: usize,
    /// A device is told to upload more one-time prekeys when fewer than this are left.
    pub prekey_low_watermark: u32,
    /// A device is told to upload more one-time MLS KeyPackages when fewer than this are left.
    pub keypackages_low_watermark: u32,
    /// Most one-time KeyPackages held per device; an upload past it is refused.
    pub max_keypackages_per_device: u32,
    /// Longest accepted KeyPackage lifetime: an uploaded KeyPackage must expire within this many
    /// milliseconds from now (12 weeks, the most openmls accepts).
    pub max_keypackage_lifetime_ms: u64,
    /// Most members (leaves) of a group this server is the hub of; a commit past it is refused
    /// (`group_full`).
    pub max_group_members: usize,
    /// Largest group submission (decoded bytes of the MLS message, GroupInfo and Welcome
    /// together). 4 MiB fits a commit adding 1,000 members with its Welcome.
    pub max_group_message_bytes: usize,
    /// Group acknowledgements are written at most this often (milliseconds), in one batch: a
    /// crash forgets at most this much of them (the devices then get those messages again).
    pub group_ack_interval_ms: u64,
    /// Group receipt markers that moved are sent to the group's hub (and by the hub to the
    /// participating servers) at most this often, in one batch per group (milliseconds).
    pub group_receipt_interval_ms: u64,
    /// A connection's acknowledgements are written at most this often (milliseconds): one that
    /// comes after a quiet interval at once, those that follow within the interval together at
    /// its end, with one `delivered` receipt per sender device. A crash forgets at most this
    /// much of them (the device then gets those events again). 0 writes every `ack` at once.
    pub ack_interval_ms: u64,
    /// Events sent to a connection but not yet acknowledged; beyond it delivery pauses until an `ack`.
    pub max_unacked_events: usize,
    /// A WebSocket write (or flush) that makes no progress for this long closes the connection:
    /// the peer stopped reading. The device resumes from its cursor when it comes back.
    pub ws_write_timeout_ms: u64,
    /// Bytes queued for one connection and not yet written to its socket (live events waiting
    /// in its buffer, frames being written). Events beyond it wait in the inbox and are read
    /// from the database once the connection has drained.
    pub ws_unsent_bytes: usize,
    /// A connection whose unsent bytes pass this (answers and notices it did not read) is closed.
    pub ws_max_unsent_bytes: usize,
    /// Unsent bytes of all connections together: beyond it, live events of every connection
    /// wait in the inbox and typing/presence notices are dropped until writes drain.
    pub ws_unsent_bytes_total: usize,
}

impl LimitsConfig {
    /// Largest WebSocket frame or HTTP send body: every envelope of a send at its maximum,
    /// base64-encoded, plus room for the JSON around it.
    pub fn max_send_bytes(&self) -> usize {
        let per_envelope = self.max_envelope_bytes.div_ceil(3) * 4 + 256;
        per_envelope * self.max_devices_per_user * 2 + 4096
    }

    /// Largest HTTP body of a group submission: [`Self::max_group_message_bytes`] base64-encoded,
    /// plus room for the JSON around it.
    pub fn max_group_send_bytes(&self) -> usize {
        self.max_group_message_bytes.div_ceil(3) * 4 + 4096
    }
}

/// Rate limits (token buckets, governor). Exceeding one gives `rate_limited` with a retry time.
/// Accounts and devices are limited first; the per-IP limits are generous, because a whole
/// office may share one address (NAT).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Frames and authenticated requests per second per device.
    pub device_per_second: u32,
    /// Burst per device.
    pub device_burst: u32,
    /// Acks, pings and read markers per second per device (frames, `GET /v1/sync` and
    /// `POST /v1/read`): a budget of their own, so a device throttled for sending can still
    /// acknowledge and drain its inbox.
    pub control_per_second: u32,
    /// Burst of acks, pings and read markers per device.
    pub control_burst: u32,
    /// Frames and authenticated requests per second per account, all its devices together.
    pub account_per_second: u32,
    /// Burst per account.
    pub account_burst: u32,
    /// HTTP requests (including WebSocket upgrades) per second per client IP. Requests with a
    /// token count here only once their account and device limits let them through.
    pub ip_per_second: u32,
    /// Burst per IP (2,000 devices reconnecting at once after an office's network blip).
    pub ip_burst: u32,
    /// Register and login attempts per minute per client IP (they cost an argon2 hash).
    pub auth_per_minute: u32,
    /// Burst of register and login attempts per IP.
    pub auth_burst: u32,
    /// Login attempts per minute per account, from any address (password guessing).
    pub login_per_account_per_minute: u32,
    /// Burst of login attempts per account.
    pub login_per_account_burst: u32,
}

/// Presence and heartbeat timing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Clients send a frame at least this often.
    pub heartbeat_interval_ms: u64,
    /// The server closes a connection silent for this long; the device goes offline.
    pub heartbeat_timeout_ms: u64,
}

/// Storage settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// A PostgreSQL server to keep the state in (`postgres://user@host:5432/db`, every option
    /// of libpq's URLs that sqlx reads); unset: the SQLite file `sqlite_file` in `data_dir`.
    /// Media, the lock file and the certificates stay in `data_dir` either way.
    pub database_url: Option<String>,
    /// Connections of the PostgreSQL pool (reads and account writes; the writer has one more).
    pub postgres_connections: u32,
    /// Database file name under `data_dir`.
    pub sqlite_file: String,
    /// SQLite `synchronous`: `full` (fsync every commit; a commit survives power loss) or
    /// `normal` (survives a crash of the process, not of the machine).
    pub synchronous: Synchronous,
    /// Keep acknowledged inbox entries as history instead of deleting them.
    pub keep_history: bool,
    /// Most operations committed in one transaction (group commit).
    pub max_batch: usize,
    /// Shortest time between the starts of two commits, in microseconds (0: commit as soon as
    /// the previous one is done). Under load, waiting gathers more operations per commit:
    /// fewer fsyncs and fewer pages written again, for up to this much latency; a write after
    /// a quiet spell is never delayed. Each commit costs CPU of its own (the fsync, the hot
    /// pages written again): 2 ms took 5–15 points of one core off the 1:1 relay at
    /// 1,000–2,000 msgs/s (BENCHMARKS.md).
    pub commit_interval_us: u64,
    /// SQLite: how often the WAL is copied back into the database file, in milliseconds (a
    /// background PASSIVE checkpoint on a pool connection; the writer's commits never copy).
    /// 25 ms: at 5,000 msgs/s on two cores the p99 was ≤ 10 ms in five runs of six, against one
    /// of six at 100 ms, for the same CPU and throughput (BENCHMARKS.md).
    pub checkpoint_interval_ms: u64,
    /// Operations waiting for the writer before new ones are refused with `unavailable`.
    pub writer_queue: usize,
}

/// SQLite synchronous mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// fsync at every commit.
    Full,
    /// fsync at checkpoints only.
    Normal,
}

/// Threads.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Threads that run connections and requests; 0: one per CPU the process may run on.
    /// With one, the scheduler is single-threaded (no work stealing, no wake-ups between
    /// workers), which on a one-core machine costs less for the same work.
    pub worker_threads: usize,
}

impl RuntimeConfig {
    /// The worker threads to start: the configured number, or one per CPU available.
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `tracing` filter, e.g. `info` or `parley_server=debug,info`. `RUST_LOG` overrides it.
    pub filter: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Push wake-ups (`spec/push.md`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// After the first message of a burst for an offline device, wait this long (ms) before
    /// pushing: the rest of the burst joins the same push.
    pub delay_ms: u64,
    /// At most one push per device this often (ms).
    pub min_interval_ms: u64,
    /// First retry delay after a failed push (ms); doubles per failure.
    pub retry_min_ms: u64,
    /// Longest retry delay (ms).
    pub retry_max_ms: u64,
    /// Failed attempts after which a wake-up is given up.
    pub max_attempts: u32,
    /// `TTL` header: how long (s) the push service may hold a wake-up for an unreachable device.
    pub ttl_secs: u64,
    /// Timeout of one push request (ms).
    pub request_timeout_ms: u64,
    /// Allow endpoints on private, loopback and link-local addresses (and plain `http`): for
    /// tests and push services inside the server's own network only.
    pub allow_private_addresses: bool,
    /// PEM file of extra CA certificates trusted for push endpoints (besides the webpki roots).
    pub extra_ca_file: Option<PathBuf>,
    /// VAPID `sub` claim: how a push service reaches this server's operator (`mailto:` or
    /// `https:`). Empty: `https://<server_name>`.
    pub vapid_subject: String,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            delay_ms: 250,
            min_interval_ms: 2000,
            retry_min_ms: 1000,
            retry_max_ms: 600_000,
            max_attempts: 20,
            ttl_secs: 86_400,
            request_timeout_ms: 10_000,
            allow_private_addresses: false,
            extra_ca_file: None,
            vapid_subject: String::new(),
        }
    }
}

/// Media (attachments; `spec/media.md`). The server stores ciphertext only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Directory of the filesystem store, relative to `data_dir` unless absolute.
    pub dir: PathBuf,
    /// Largest file (ciphertext bytes) accepted.
    pub max_file_bytes: u64,
    /// Size of every upload part but the last (the unit of parallel and resumed uploads).
    pub part_bytes: u64,
    /// Bytes of media one user may hold, uploads in progress included (a file counts once
    /// for each user who uploaded or forwarded it).
    pub quota_bytes: u64,
    /// Uploads one user may have in progress.
    pub max_pending_uploads: u32,
    /// An upload not completed within this long is dropped with what it received.
    pub upload_ttl_ms: u64,
    /// Lifetime of an upload part URL.
    pub url_ttl_ms: u64,
    /// How long a user's reference to a file lasts after their last upload or forward of it.
    pub retention_ms: u64,
    /// A file no one references any more is deleted this long after its last reference went.
    pub grace_ms: u64,
    /// How often expired uploads, references and unreferenced files are swept.
    pub sweep_interval_ms: u64,
    /// Longest fetch of a file from another server (for a local user's download).
    pub fetch_timeout_ms: u64,
    /// An S3-compatible store instead of the filesystem (`[media.s3]`): clients then upload
    /// parts straight to it through presigned URLs.
    pub s3: Option<S3Config>,
    /// A colder store that files move to once they are old (`[media.cold]`).
    pub cold: Option<ColdConfig>,
    /// Honour temporary chats (`SendRequest.media_once`): their files go once every device
    /// they were sent to downloaded them. Off: such files live by the usual retention.
    pub temporary: bool,
}

/// A second, colder store (cheaper storage class, another bucket, a slower disk): files move
/// there `after_ms` after they were stored, and are read from there from then on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColdConfig {
    /// Age of a file (since it was stored here) at which it moves.
    pub after_ms: u64,
    /// A filesystem store (relative to `data_dir` unless absolute) ...
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// ... or an S3-compatible one (exactly one of the two).
    #[serde(default)]
    pub s3: Option<S3Config>,
}

/// An S3-compatible object store.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL, e.g. `https://s3.eu-west-1.amazonaws.com` or `http://127.0.0.1:9000`.
    pub endpoint: String,
    /// Region the requests are signed for.
    #[serde(default = "default_region")]
    pub region: String,
    /// Bucket (must exist).
    pub bucket: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key (never logged).
    pub secret_access_key: String,
    /// Allow a plain `http://` endpoint (tests, a store on the same host).
    #[serde(default)]
    pub allow_http: bool,
    /// Address the bucket as `bucket.endpoint` instead of `endpoint/bucket`.
    #[serde(default)]
    pub virtual_hosted_style: bool,
}

fn default_region() -> String {
    "us-east-1".into()
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .finish()
    }
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("media"),
            max_file_bytes: 2 * 1024 * 1024 * 1024,
            part_bytes: 8 * 1024 * 1024,
            quota_bytes: 10 * 1024 * 1024 * 1024,
            max_pending_uploads: 16,
            upload_ttl_ms: 24 * 3600 * 1000,
            url_ttl_ms: 3600 * 1000,
            retention_ms: 30 * 24 * 3600 * 1000,
            grace_ms: 3600 * 1000,
            sweep_interval_ms: 60_000,
            fetch_timeout_ms: 600_000,
            s3: None,
            cold: None,
            temporary: true,
        }
    }
}

/// Federation: the HTTPS listener other servers call, discovery, delivery and access control.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FederationConfig {
    /// Serve and send federation. Off: users of other servers are unknown here.
    pub enabled: bool,
    /// HTTPS listener for other servers (`/_parley/...`). 8448 is the default federation port.
    pub listen: SocketAddr,
    /// PEM certificate chain of the listener; it must be valid for the name other servers
    /// reach this one by. Required when federation is enabled.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the listener.
    pub tls_key: Option<PathBuf>,
    /// PEM file of extra CA certificates trusted for outbound connections, in addition to the
    /// webpki roots (for private federations and the devnet).
    pub extra_ca_file: Option<PathBuf>,
    /// DNS servers used for discovery (`ip:port`). Empty: the system's resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// Port on which `/.well-known/parley/server` is fetched over HTTPS (443 on the Internet).
    pub well_known_port: u16,
    /// Port tried when neither a delegation nor an SRV record names one.
    pub default_port: u16,
    /// Only these servers may federate with this one (empty: every server not denied).
    pub allow: Vec<ServerName>,
    /// These servers are refused, in both directions.
    pub deny: Vec<ServerName>,
    /// Requests signed further than this from our clock (either way) are rejected as stale.
    pub max_clock_skew_ms: u64,
    /// Requests per second accepted from one origin server.
    pub origin_per_second: u32,
    /// Burst of requests from one origin server.
    pub origin_burst: u32,
    /// Requests per minute from one IP address that fail authentication (bad or unknown
    /// signatures, wrong destination...) before that address is refused for a while.
    pub failed_auth_per_minute: u32,
    /// Burst of failed requests from one IP address.
    pub failed_auth_burst: u32,
    /// Most items (messages, receipts, ...) in one outbound transaction; at most
    /// `MAX_TXN_ITEMS`, what a peer accepts.
    pub max_txn_items: usize,
    /// Largest outbound transaction body, in bytes (inbound bodies may be twice as large).
    pub max_txn_bytes: usize,
    /// First retry delay after a failed transaction; doubles per failure (with jitter).
    pub retry_min_ms: u64,
    /// Longest retry delay.
    pub retry_max_ms: u64,
    /// Typing and presence for a destination that has been failing this long are dropped.
    pub drop_ephemeral_after_ms: u64,
    /// Presence on its own goes to a destination at most this often (changes in between are
    /// coalesced, newest per user).
    pub presence_interval_ms: u64,
    /// Timeout of one request to another server.
    pub request_timeout_ms: u64,
    /// Requests in flight to one other server at a time, and so the connections this server
    /// opens to it (media downloads not counted); more wait their turn within
    /// `request_timeout_ms`.
    pub max_requests_per_destination: usize,
    /// Inbound transaction ids, and the (origin, id) of inbound messages, are remembered this
    /// long (a repeat within it is ignored).
    pub txn_retention_ms: u64,
    /// One-time prekeys of one local device that one other server may claim per
    /// `one_time_claim_window_ms` (all its users together); past it, claims get the device's
    /// last-resort prekey. Keeps a server from draining a device's one-time prekeys.
    pub one_time_claims_per_server: u32,
    /// One-time prekeys of one local device that one user of another server may claim per
    /// `one_time_claim_window_ms`; past it, claims get the last-resort prekey.
    pub one_time_claims_per_user: u32,
    /// The window of the two limits above (they refill evenly over it).
    pub one_time_claim_window_ms: u64,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 8448)),
            tls_cert: None,
            tls_key: None,
            extra_ca_file: None,
            nameservers: Vec::new(),
            well_known_port: 443,
            default_port: 8448,
            allow: Vec::new(),
            deny: Vec::new(),
            max_clock_skew_ms: 300_000,
            origin_per_second: 200,
            origin_burst: 1000,
            failed_auth_per_minute: 600,
            failed_auth_burst: 100,
            max_txn_items: 5000,
            max_txn_bytes: 4 * 1024 * 1024,
            retry_min_ms: 500,
            retry_max_ms: 600_000,
            drop_ephemeral_after_ms: 60_000,
            presence_interval_ms: 500,
            request_timeout_ms: 30_000,
            max_requests_per_destination: 32,
            txn_retention_ms: 7 * 24 * 3600 * 1000,
            one_time_claims_per_server: 10,
            one_time_claims_per_user: 3,
            one_time_claim_window_ms: 24 * 3600 * 1000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: ServerName::parse("localhost").expect("a valid server name"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8008)),
            data_dir: PathBuf::from("data"),
            server_key_file: PathBuf::from("server.key"),
            registration: RegistrationConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            rate_limits: RateLimitConfig::default(),
            presence: PresenceConfig::default(),
            storage: StorageConfig::default(),
            log: LogConfig::default(),
            runtime: RuntimeConfig::default(),
            federation: FederationConfig::default(),
            media: MediaConfig::default(),
            push: PushConfig::default(),
            cluster: ClusterConfig::default(),
        }
    }
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self { mode: RegistrationMode::Open }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            argon2_memory_kib: 19456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            min_password_bytes: 8,
            hash_concurrency: 0,
            hash_queue: 128,
            hash_queue_timeout_ms: 5000,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_envelope_bytes: 256 * 1024,
            max_devices_per_user: 10,
            max_request_bytes: 64 * 1024,
            sync_page: 500,
            max_sync_timeout_ms: 60_000,
            connection_buffer: 256,
            ws_read_buffer_bytes: 2048,
            ws_write_buffer_bytes: 4096,
            prekey_low_watermark: 20,
            keypackages_low_watermark: 20,
            max_keypackages_per_device: 200,
            max_keypackage_lifetime_ms: 12 * 7 * 24 * 60 * 60 * 1000,
            max_group_members: 1000,
            max_group_message_bytes: 4 * 1024 * 1024,
            group_ack_interval_ms: 200,
            group_receipt_interval_ms: 1000,
            ack_interval_ms: 1000,
            max_unacked_events: 4096,
            ws_write_timeout_ms: 10_000,
            ws_unsent_bytes: 1024 * 1024,
            ws_max_unsent_bytes: 4 * 1024 * 1024,
            ws_unsent_bytes_total: 256 * 1024 * 1024,
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            device_per_second: 100,
            device_burst: 500,
            control_per_second: 200,
            control_burst: 1000,
            account_per_second: 200,
            account_burst: 1000,
            ip_per_second: 500,
            ip_burst: 5000,
            auth_per_minute: 300,
            auth_burst: 100,
            login_per_account_per_minute: 10,
            login_per_account_burst: 10,
        }
    }
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { heartbeat_interval_ms: 15_000, heartbeat_timeout_ms: 45_000 }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            database_url: None,
            postgres_connections: 16,
            sqlite_file: "parley.db".into(),
            synchronous: Synchronous::Full,
            keep_history: false,
            max_batch: 2048,
            commit_interval_us: 2_000,
            checkpoint_interval_ms: 25,
            writer_queue: 65_536,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: "info".into(), format: LogFormat::Text }
    }
}

/// A configuration that failed to load or is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file, variable or flag has the wrong shape.
    #[error("{0}")]
    Load(#[from] Box<figment::Error>),
    /// The values load but do not make sense together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads defaults, then `file` (when given), then `PARLEY__*` environment variables, then
    /// `overrides` (flags), and checks the result.
    pub fn load(file: Option<&Path>, overrides: impl Serialize) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!("config file {} does not exist", file.display())));
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: Config = figment
            .merge(Env::prefixed("PARLEY__").split("__").lowercase(true))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(Box::new)?;
        config.check()?;
        Ok(config)
    }

    /// Semantic checks that serde cannot express.
    pub fn check(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.cluster.nats_url.is_some() && self.storage.database_url.is_none() {
            return bad("cluster.nats_url needs storage.database_url: the workers share one PostgreSQL database");
        }
        if self.cluster.subject_prefix.contains(|c: char| c == '.' || c == '*' || c == '>' || c.is_whitespace()) {
            return bad("cluster.subject_prefix is one NATS token: no dots, wildcards or spaces");
        }
        if self.presence.heartbeat_timeout_ms <= self.presence.heartbeat_interval_ms {
            return bad("presence.heartbeat_timeout_ms must be greater than heartbeat_interval_ms");
        }
        if self.limits.max_devices_per_user == 0
            || self.limits.max_envelope_bytes == 0
            || self.limits.sync_page == 0
            || self.limits.max_unacked_events == 0
            || self.limits.ws_write_timeout_ms == 0
            || self.limits.ws_unsent_bytes == 0
            || self.limits.ws_unsent_bytes_total == 0
            || self.limits.max_keypackages_per_device == 0
            || self.limits.max_keypackage_lifetime_ms == 0
            || self.limits.max_group_members == 0
            || self.limits.max_group_message_bytes == 0
            || self.limits.group_ack_interval_ms == 0
            || self.limits.group_receipt_interval_ms == 0
        {
            return bad("limits must be positive");
        }
        if self.limits.ws_max_unsent_bytes < self.limits.ws_unsent_bytes {
            return bad("limits.ws_max_unsent_bytes must be at least limits.ws_unsent_bytes");
        }
        if self.storage.max_batch == 0 || self.storage.writer_queue == 0 {
            return bad("storage.max_batch and storage.writer_queue must be positive");
        }
        if self.limits.ack_interval_ms > 60_000 {
            return bad("limits.ack_interval_ms must be at most 60000");
        }
        if !(1..=60_000).contains(&self.storage.checkpoint_interval_ms) {
            return bad("storage.checkpoint_interval_ms must be between 1 and 60000");
        }
        let rl = &self.rate_limits;
        let rates = [
            rl.device_per_second,
            rl.device_burst,
            rl.control_per_second,
            rl.control_burst,
            rl.account_per_second,
            rl.account_burst,
            rl.ip_per_second,
            rl.ip_burst,
            rl.auth_per_minute,
            rl.auth_burst,
            rl.login_per_account_per_minute,
            rl.login_per_account_burst,
        ];
        if rates.contains(&0) {
            return bad("rate limits must be positive");
        }
        if self.auth.argon2_iterations == 0
            || self.auth.argon2_parallelism == 0
            || self.auth.argon2_memory_kib < 8 * self.auth.argon2_parallelism
        {
            return bad("argon2 parameters out of range");
        }
        if self.auth.hash_queue_timeout_ms == 0 {
            return bad("auth.hash_queue_timeout_ms must be positive");
        }
        let fed = &self.federation;
        if fed.enabled && (fed.tls_cert.is_none() || fed.tls_key.is_none()) {
            return bad("federation.enabled needs federation.tls_cert and federation.tls_key");
        }
        if fed.max_txn_items == 0
            || fed.max_txn_bytes < 64 * 1024
            || fed.origin_per_second == 0
            || fed.origin_burst == 0
            || fed.failed_auth_per_minute == 0
            || fed.failed_auth_burst == 0
            || fed.max_requests_per_destination == 0
        {
            return bad("federation limits must be positive (max_txn_bytes at least 64 KiB)");
        }
        let media = &self.media;
        if media.max_file_bytes == 0
            || media.part_bytes < 64 * 1024
            || media.max_pending_uploads == 0
            || media.upload_ttl_ms == 0
            || media.url_ttl_ms == 0
            || media.sweep_interval_ms == 0
            || media.fetch_timeout_ms == 0
        {
            return bad("media limits must be positive (part_bytes at least 64 KiB)");
        }
        if let Some(cold) = &media.cold {
            if cold.dir.is_some() == cold.s3.is_some() {
                return bad("media.cold needs exactly one of dir and s3");
            }
        }
        // S3 refuses a multipart upload whose parts (but the last) are under 5 MiB.
        if media.s3.is_some() && media.part_bytes < 5 * 1024 * 1024 {
            return bad("media.part_bytes must be at least 5 MiB (5242880) with an S3 store");
        }
        if media.max_file_bytes.div_ceil(media.part_bytes) > u64::from(crate::media::MAX_PARTS) {
            return Err(ConfigError::Invalid(format!(
                "media.max_file_bytes / media.part_bytes must be at most {} parts",
                crate::media::MAX_PARTS
            )));
        }
        let push = &self.push;
        if push.retry_min_ms == 0
            || push.retry_max_ms < push.retry_min_ms
            || push.max_attempts == 0
            || push.request_timeout_ms == 0
        {
            return bad("push retry limits must be positive (retry_max_ms at least retry_min_ms)");
        }
        // A peer refuses a larger transaction whole: the queue would resend it forever.
        if fed.max_txn_items > MAX_TXN_ITEMS {
            return Err(ConfigError::Invalid(format!(
                "federation.max_txn_items must be at most {MAX_TXN_ITEMS} (what a peer accepts in one transaction)"
            )));
        }
        if fed.retry_min_ms == 0 || fed.retry_max_ms < fed.retry_min_ms || fed.request_timeout_ms == 0 {
            return bad("federation.retry_min_ms must be positive and at most retry_max_ms");
        }
        if fed.one_time_claim_window_ms == 0 {
            return bad("federation.one_time_claim_window_ms must be positive");
        }
        Ok(())
    }

    /// The first token of this homeserver's NATS subjects (see [`ClusterConfig`]).
    pub fn subject_prefix(&self) -> String {
        if self.cluster.subject_prefix.is_empty() {
            format!("parley_{}", self.server_name.as_str().replace(['.', ':'], "_"))
        } else {
            self.cluster.subject_prefix.clone()
        }
    }

    /// The database file.
    pub fn database_path(&self) -> PathBuf {
        self.data_dir.join(&self.storage.sqlite_file)
    }

    /// The server key's file ([`Config::server_key_file`] under `data_dir` unless absolute).
    pub fn server_key_path(&self) -> PathBuf {
        self.data_dir.join(&self.server_key_file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../parleyd.example.toml");

    #[test]
    fn example_config_is_the_default_and_complete() {
        let parsed: Config = toml::from_str(EXAMPLE).expect("example parses");
        assert_eq!(parsed, Config::default(), "parleyd.example.toml must show the defaults");
        // Every key of the default config appears in the example (so new keys get documented).
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        let example: toml::Value = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(defaults, example, "parleyd.example.toml must list every key");
        // Every key line is preceded by a comment line.
        let lines: Vec<&str> = EXAMPLE.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.contains(" = ") && !line.starts_with('#') {
                assert!(i > 0 && lines[i - 1].starts_with('#'), "key without comment: {line}");
            }
        }
    }

    #[test]
    fn env_and_overrides_layer() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "server_name = \"a.example\"\n[limits]\nmax_devices_per_user = 3\n").unwrap();
        let overrides = serde_json::json!({ "listen": "127.0.0.1:0" });
        let config = Config::load(Some(&file), overrides).unwrap();
        assert_eq!(config.server_name.as_str(), "a.example");
        assert_eq!(config.limits.max_devices_per_user, 3);
        assert_eq!(config.listen.port(), 0);
        std::fs::write(&file, "bogus_key = 1\n").unwrap();
        assert!(Config::load(Some(&file), serde_json::json!({})).is_err());
    }

    /// Sets `key` to each value with `set` and checks that exactly those marked `false` are
    /// refused, by an error that names `key`.
    fn check_interval(key: &str, set: impl Fn(&mut Config, u64), cases: &[(u64, bool)]) {
        let mut config = Config::default();
        for &(ms, ok) in cases {
            set(&mut config, ms);
            match config.check() {
                Ok(()) => assert!(ok, "{key} = {ms} accepted"),
                Err(error) => {
                    assert!(!ok, "{key} = {ms} refused: {error}");
                    assert!(error.to_string().contains(key), "{error}");
                }
            }
        }
    }

    #[test]
    fn an_ack_interval_over_a_minute_is_refused() {
        let cases = [(0, true), (60_000, true), (60_001, false)];
        check_interval("limits.ack_interval_ms", |c, ms| c.limits.ack_interval_ms = ms, &cases);
    }

    #[test]
    fn a_checkpoint_interval_outside_1_ms_to_a_minute_is_refused() {
        let cases = [(0, false), (1, true), (60_000, true), (60_001, false)];
        check_interval("storage.checkpoint_interval_ms", |c, ms| c.storage.checkpoint_interval_ms = ms, &cases);
    }

    #[test]
    fn transactions_larger_than_a_peer_accepts_are_refused() {
        let mut config = Config::default();
        config.federation.max_txn_items = MAX_TXN_ITEMS;
        config.check().expect("the peers' limit itself is fine");
        config.federation.max_txn_items += 1;
        let error = config.check().expect_err("one more is refused").to_string();
        assert!(error.contains("federation.max_txn_items"), "{error}");
    }

    #[test]
    fn media_files_may_not_need_more_parts_than_an_upload_has() {
        let mut config = Config::default();
        config.check().expect("the defaults are consistent");
        config.media.part_bytes = 64 * 1024;
        let error = config.check().expect_err("2 GiB in 64 KiB parts is 32,768 parts").to_string();
        assert!(error.contains("media.max_file_bytes"), "{error}");
        config.media.max_file_bytes = u64::from(crate::media::MAX_PARTS) * 64 * 1024;
        config.check().expect("exactly the most parts is fine");
        config.media.part_bytes = 1024;
        assert!(config.check().is_err(), "parts under 64 KiB are refused");
    }

    #[test]
    fn a_cold_store_is_one_store() {
        let mut config = Config::default();
        config.media.cold = Some(ColdConfig { after_ms: 1000, dir: None, s3: None });
        let error = config.check().expect_err("no store").to_string();
        assert!(error.contains("media.cold"), "{error}");
        config.media.cold = Some(ColdConfig { after_ms: 1000, dir: Some("cold".into()), s3: None });
        config.check().expect("a directory");
    }

    #[test]
    fn parts_for_s3_are_at_least_what_s3_accepts() {
        let mut config = Config::default();
        config.media.s3 = Some(S3Config {
            endpoint: "http://127.0.0.1:9000".into(),
            region: default_region(),
            bucket: "media".into(),
            access_key_id: "key".into(),
            secret_access_key: "secret".into(),
            allow_http: true,
            virtual_hosted_style: false,
        });
        config.media.part_bytes = 5 * 1024 * 1024;
        config.media.max_file_bytes = 1024 * 1024 * 1024;
        config.check().expect("5 MiB parts are fine");
        config.media.part_bytes -= 1;
        let error = config.check().expect_err("S3 refuses smaller parts").to_string();
        assert!(error.contains("5 MiB"), "{error}");
        assert!(!format!("{config:?}").contains("secret\""), "the secret is not printed");
    }
}
