//! `parley`: the command-line client of Parley, end-to-end encrypted chat from a terminal.
//!
//! Every account-device lives in a *profile*: a directory `DIR/NAME/` (`--data-dir`, default
//! `$PARLEY_HOME` or `~/.parley`; `--profile`, default `default`) holding the local store
//! `store.db` (keys, sessions, history, outbox). One machine can hold several profiles, so
//! several accounts or devices. The server URL is given once, at `register` or `login`, and
//! remembered in the profile.
//!
//! ```text
//! parley register alice                 # asks for a password, prints the recovery secret once
//! parley send @bob:example.org hello
//! parley history @bob:example.org
//! parley chat bob                       # a bare name means a user of your own server
//! parley verify bob                     # safety number to compare with bob
//! parley group create team bob carol    # an end-to-end encrypted group; prints its id
//! parley send '!abc…:example.org' hi    # a group id (starts with !) works where a user does
//! parley chats                          # 1:1 and group conversations, latest first
//! parley send bob --file cat.jpg 'look' # a file, end-to-end encrypted, with a caption
//! parley download bob 3f2a              # a message's file (by id prefix) into the current dir
//! ```
//!
//! With `--json` every command prints one JSON object per line on stdout. Errors print
//! `error: ...` on stderr (and `{"error": ..., "code": ...}` on stdout with `--json`) and exit
//! with status 1; command-line usage errors exit with status 2.
//!
//! Access tokens are never printed; the recovery secret is printed once, by `register`.

#[path = "parley/commands.rs"]
mod commands;
#[path = "parley/output.rs"]
mod output;
#[path = "parley/profile.rs"]
mod profile;

use clap::{Parser, Subcommand};
use output::Out;
use parley_sdk::messenger::{GroupError, MessengerError};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// The server used by `register` and `login` when `--server` is not given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8008";

/// Parley command-line client: end-to-end encrypted chat from the terminal.
///
/// Start with `parley register NAME` (or `parley login NAME --recovery SECRET` to add this
/// machine as a new device of an existing account), then `parley chat @friend:server`.
#[derive(Debug, Parser)]
#[command(name = "parley", version, about, long_about)]
struct Cli {
    /// Server URL, for `register` and `login` [default: http://127.0.0.1:8008]. It is stored in
    /// the profile, so later commands do not need it.
    #[arg(long, global = true, value_name = "URL")]
    server: Option<String>,
    /// Profile to use: each profile is one device of one account.
    #[arg(long, global = true, env = "PARLEY_PROFILE", default_value = "default", value_name = "NAME")]
    profile: String,
    /// Directory holding the profiles [default: ~/.parley].
    #[arg(long, global = true, env = "PARLEY_HOME", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Machine-readable output: one JSON object per line.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the server before giving up.
    #[arg(long, global = true, default_value_t = 30, value_name = "SECS")]
    timeout: u64,
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Create an account, with this profile as its first device. Prints the recovery secret
    /// once: write it down, it is the only way to add more devices.
    Register {
        /// The account name (a-z, 0-9 and . _ = -).
        username: String,
        /// The password (default: the first line of stdin). Prefer stdin or PARLEY_PASSWORD:
        /// command-line arguments are visible to other local users.
        #[arg(long, env = "PARLEY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// Add this profile as a new device of an existing account.
    Login {
        /// The account name.
        username: String,
        /// The recovery secret shown at registration (64 hex digits; spaces are ignored).
        #[arg(long, env = "PARLEY_RECOVERY", hide_env_values = true, value_name = "SECRET_HEX")]
        recovery: String,
        /// The password (default: the first line of stdin).
        #[arg(long, env = "PARLEY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
    /// Send a message (or a file) and wait until the server has stored it.
    Send {
        /// The recipient: @name:server, just name for a user of your own server, or a group id
        /// (!id:server).
        user: String,
        /// The message (words are joined with spaces; default: all of stdin, or with --file
        /// no text).
        text: Vec<String>,
        /// Send this file, end-to-end encrypted (the text is its caption). An interrupted
        /// upload resumes when the same command runs again.
        #[arg(long, value_name = "PATH")]
        file: Option<PathBuf>,
        /// A temporary chat's file (1:1, a user of your own server): the server deletes it once
        /// every device it went to downloaded it.
        #[arg(long, requires = "file")]
        temporary: bool,
    },
    /// Download the file of a message (see `history`), decrypt it and check it. An
    /// interrupted download resumes when the same command runs again.
    Download {
        /// The conversation: @name:server, just name, or a group id (!id:server).
        user: String,
        /// The message's id (its `client_msg_id`; a unique prefix is enough).
        message: String,
        /// Where to write the file (default: its name, in the current directory; a directory
        /// means that name in it).
        #[arg(long, short, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Fetch new messages, then print the conversation with a user or a group, oldest first.
    History {
        /// The other party: @name:server, just name, or a group id (!id:server).
        user: String,
        /// How many of the latest messages to print.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Chat interactively: shows the user's messages as they arrive and sends every line you
    /// type. Leave with /quit or end of input (Ctrl-D).
    Chat {
        /// The other party: @name:server, just name, or a group id (!id:server).
        user: String,
        /// How many earlier messages to show first.
        #[arg(long, default_value_t = 10, value_name = "N")]
        last: u32,
    },
    /// Fetch new messages, then list the conversations, 1:1 and groups together, latest first.
    Chats,
    /// End-to-end encrypted groups (MLS): create, add, remove, members, list.
    Group {
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// List this account's devices (or remove one: `devices remove DEVICE_ID`).
    Devices {
        #[command(subcommand)]
        command: Option<DevicesCommand>,
    },
    /// Show the safety number to compare with a user, to rule out anyone in the middle.
    Verify {
        /// The other party: @name:server, or just name.
        user: String,
    },
    /// Subscribe to a user's presence and show it.
    Presence {
        /// The user: @name:server, or just name.
        user: String,
    },
    /// Show which account and device this profile is.
    Whoami,
}

/// The `group` subcommands.
#[derive(Debug, Subcommand)]
enum GroupCommand {
    /// Create a group hubbed on your server, with every device of the given users and your
    /// other devices. Its name travels end-to-end encrypted. Prints the group id.
    Create {
        /// The group's name.
        name: String,
        /// Members: @name:server, or just name.
        users: Vec<String>,
    },
    /// Add users (every device of each) to a group.
    Add {
        /// The group id (!id:server).
        group: String,
        /// Users: @name:server, or just name.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove users (every device of each) from a group.
    Remove {
        /// The group id (!id:server).
        group: String,
        /// Users: @name:server, or just name.
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Leave a group with all your devices (another member commits your removal).
    Leave {
        /// The group id (!id:server).
        group: String,
    },
    /// Change a group's settings (you must be one of its admins); they travel end-to-end
    /// encrypted to the members, who hold everyone to them. Prints the settings.
    Set {
        /// The group id (!id:server).
        group: String,
        /// A new name.
        #[arg(long)]
        name: Option<String>,
        /// A new topic ("" clears it).
        #[arg(long)]
        topic: Option<String>,
        /// The admins, who may add members and remove others (comma-separated users).
        #[arg(long, value_delimiter = ',')]
        admins: Option<Vec<String>>,
        /// The most member devices (0 clears the limit).
        #[arg(long)]
        max_members: Option<u32>,
    },
    /// Fetch new messages, then list a group's members (user and device).
    Members {
        /// The group id (!id:server).
        group: String,
    },
    /// Fetch new messages, then list this device's groups, latest activity first.
    List,
}

/// The `devices` subcommands.
#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// Remove another device of this account: it leaves the signed device list, every group
    /// (one commit each) and the server. Prints the groups it was removed from.
    Remove {
        /// The device id (see `parley devices`).
        device_id: String,
        /// The account's password (default: the first line of stdin).
        #[arg(long, env = "PARLEY_PASSWORD", hide_env_values = true)]
        password: Option<String>,
    },
}

/// A failure the client itself detected, with a machine-readable code.
#[derive(Debug)]
pub struct Failure {
    /// Stable code for `--json` (`no_profile`, `usage`, `timeout`, ...).
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// An [`anyhow::Error`] carrying a [`Failure`].
pub fn fail(code: &'static str, message: impl Into<String>) -> anyhow::Error {
    Failure { code, message: message.into() }.into()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            if !error.use_stderr() {
                // --help or --version.
                return ExitCode::SUCCESS;
            }
            if std::env::args_os().any(|a| a == "--json") {
                let rendered = error.to_string();
                let first = rendered.lines().next().unwrap_or_default();
                let message = first.strip_prefix("error: ").unwrap_or(first);
                output::print_line(&serde_json::json!({ "error": message, "code": "usage" }).to_string());
            }
            return ExitCode::from(2);
        }
    };
    let out = Out::new(cli.json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            report(&out, &anyhow::Error::new(error).context("cannot start the async runtime"));
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli, &out)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            report(&out, &error);
            ExitCode::FAILURE
        }
    };
    // A read of stdin may still be pending on a blocking thread (interactive chat); it cannot
    // be cancelled, so leave without waiting for the runtime to wind down.
    runtime.shutdown_background();
    code
}

async fn run(cli: Cli, out: &Out) -> anyhow::Result<()> {
    let profile = profile::Profile::locate(cli.data_dir, &cli.profile)?;
    let ctx = commands::Ctx { out: out.clone(), server: cli.server, profile, timeout: Duration::from_secs(cli.timeout.max(1)) };
    match cli.command {
        Command::Register { username, password } => commands::register(&ctx, &username, password).await,
        Command::Login { username, recovery, password } => commands::login(&ctx, &username, &recovery, password).await,
        Command::Send { user, text, file, temporary } => commands::send(&ctx, &user, text, file, temporary).await,
        Command::Download { user, message, out, force } => commands::download(&ctx, &user, &message, out, force).await,
        Command::History { user, limit } => commands::history(&ctx, &user, limit).await,
        Command::Chat { user, last } => commands::chat(&ctx, &user, last).await,
        Command::Chats => commands::chats(&ctx).await,
        Command::Group { command } => match command {
            GroupCommand::Create { name, users } => commands::group_create(&ctx, &name, &users).await,
            GroupCommand::Add { group, users } => commands::group_add(&ctx, &group, &users).await,
            GroupCommand::Remove { group, users } => commands::group_remove(&ctx, &group, &users).await,
            GroupCommand::Leave { group } => commands::group_leave(&ctx, &group).await,
            GroupCommand::Set { group, name, topic, admins, max_members } => {
                commands::group_set(&ctx, &group, commands::GroupSettings { name, topic, admins, max_members }).await
            }
            GroupCommand::Members { group } => commands::group_members(&ctx, &group).await,
            GroupCommand::List => commands::group_list(&ctx).await,
        },
        Command::Devices { command: None } => commands::devices(&ctx).await,
        Command::Devices { command: Some(DevicesCommand::Remove { device_id, password }) } => {
            commands::device_remove(&ctx, &device_id, password).await
        }
        Command::Verify { user } => commands::verify(&ctx, &user).await,
        Command::Presence { user } => commands::presence(&ctx, &user).await,
        Command::Whoami => commands::whoami(&ctx).await,
    }
}

/// Prints `error` as one `error: ...` line on stderr, and with `--json` also as a JSON line on
/// stdout.
fn report(out: &Out, error: &anyhow::Error) {
    let message = one_line(error);
    eprintln!("error: {message}");
    if out.is_json() {
        output::print_line(&serde_json::json!({ "error": message, "code": error_code(error) }).to_string());
    }
}

/// An error and its causes on one line, `outer: inner: ...`, leaving out a cause whose text
/// the line already contains (many errors repeat their source in their own message).
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
        if text.is_empty() || line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

/// The machine-readable code of an error: the server's error code when the server refused,
/// otherwise what kind of failure it was.
fn error_code(error: &anyhow::Error) -> String {
    for cause in error.chain() {
        if let Some(failure) = cause.downcast_ref::<Failure>() {
            return failure.code.to_owned();
        }
        if let Some(error) = cause.downcast_ref::<MessengerError>() {
            return messenger_code(error);
        }
        if let Some(error) = cause.downcast_ref::<parley_sdk::Error>() {
            return sdk_code(error);
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return "io".to_owned();
        }
    }
    "error".to_owned()
}

fn messenger_code(error: &MessengerError) -> String {
    match error {
        MessengerError::Sdk(error) => sdk_code(error),
        MessengerError::Untrusted { .. } => "untrusted".to_owned(),
        MessengerError::Crypto(_) => "crypto".to_owned(),
        MessengerError::Profile(_) => "profile".to_owned(),
        MessengerError::Group(error) => group_code(error),
        MessengerError::InvalidRequest(_) => "usage".to_owned(),
        MessengerError::Media(error) => media_code(error),
        _ => "error".to_owned(),
    }
}

fn media_code(error: &parley_sdk::media::MediaError) -> String {
    use parley_sdk::media::MediaError;
    match error {
        MediaError::Api(error) => return sdk_code(error),
        MediaError::File(..) => "io",
        MediaError::Corrupt(_) => "corrupt",
        MediaError::Cancelled => "cancelled",
        MediaError::Gone => "media_gone",
        MediaError::Protocol(_) => "protocol",
        _ => "error",
    }
    .to_owned()
}

fn group_code(error: &GroupError) -> String {
    match error {
        GroupError::Store(_) => "store",
        GroupError::Mls(_) => "crypto",
        GroupError::UnknownGroup(_) => "unknown_group",
        GroupError::NotActive { .. } => "group_inactive",
        GroupError::CommitPending(_) => "commit_pending",
        GroupError::NotSupported(_) => "not_supported",
        GroupError::NotAllowed(_) => "not_allowed",
        GroupError::InvalidRequest(_) => "usage",
        GroupError::Conflict { .. } => "epoch_conflict",
        GroupError::Behind { .. } => "behind",
        _ => "error",
    }
    .to_owned()
}

fn sdk_code(error: &parley_sdk::Error) -> String {
    use parley_sdk::Error;
    match error {
        Error::Server { body, .. } => body.code.as_str().to_owned(),
        Error::Http(_) | Error::WebSocket(_) => "network".to_owned(),
        Error::Timeout => "timeout".to_owned(),
        Error::Closed | Error::NotConnected => "disconnected".to_owned(),
        Error::InvalidUrl(_) => "invalid_url".to_owned(),
        Error::Store(_) => "store".to_owned(),
        Error::Decode(_) | Error::Protocol(_) => "protocol".to_owned(),
        _ => "error".to_owned(),
    }
}
