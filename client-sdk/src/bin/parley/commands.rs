//! The commands. Those that need the device's connection (`register`, `login`, `send`,
//! `history`, `chat`, `verify`, `group`, `devices remove`) lock the profile, open a
//! [`Messenger`] and close it cleanly at the end, so that everything the server already handed
//! over is decrypted and stored before the process exits. The others (`devices`, `presence`, `whoami`) only read the stored session
//! and make HTTP requests.

use crate::output::{format_time, grouped_hex, hex, indent_body, parse_secret, terminal_safe, Out};
use crate::profile::{Profile, ProfileLock};
use crate::{fail, one_line, report, DEFAULT_SERVER};
use anyhow::Context as _;
use parley_crypto::safety::safety_number;
use parley_sdk::e2ee::StoreError;
use parley_sdk::messenger::{AddReport, GroupMessage, Messenger, MessengerError, MessengerEvent, MessengerEvents};
use parley_sdk::spec::GroupId;
use parley_sdk::store::StoredMessage;
use parley_sdk::Attachment;
use parley_sdk::{Api, DeviceId, ErrorCode, PresenceStatus, ServerMsgId, Session, UserId};
use serde_json::json;
use std::collections::HashSet;
use std::future::Future;
use std::io::IsTerminal as _;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, BufReader};
use tokio::time::Instant;
use uuid::Uuid;
use zeroize::Zeroizing;

/// What every command gets: the output, the options, the profile.
pub struct Ctx {
    /// Where results go.
    pub out: Out,
    /// `--server`, if given.
    pub server: Option<String>,
    /// The selected profile.
    pub profile: Profile,
    /// How long to wait for the server.
    pub timeout: Duration,
}

impl Ctx {
    /// The server for a new profile.
    fn new_server(&self) -> &str {
        self.server.as_deref().unwrap_or(DEFAULT_SERVER)
    }

    /// Refuses an explicit `--server` that is not the profile's.
    fn check_server(&self, session: &Session) -> anyhow::Result<()> {
        match &self.server {
            Some(given) if !same_server(given, &session.base_url) => Err(fail(
                "server_mismatch",
                format!(
                    "profile {:?} belongs to {}, not {given}: leave out --server, or choose another profile with --profile",
                    self.profile.name(),
                    session.base_url
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The stored session and an HTTP handle for it.
    async fn api(&self) -> anyhow::Result<(Session, Api)> {
        let session = self.profile.session().await?;
        self.check_server(&session)?;
        let api = Api::new(&session)?;
        Ok((session, api))
    }

    /// Locks the profile and connects its device.
    async fn connect(&self) -> anyhow::Result<Device> {
        let lock = self.profile.lock().await?;
        let session = self.profile.session().await?;
        self.check_server(&session)?;
        let (messenger, events) = self
            .within(&format!("connecting to {}", session.base_url), Messenger::open(&self.profile.store_path()))
            .await?
            .with_context(|| format!("cannot connect to {}", session.base_url))?;
        Ok(Device { messenger, events, _lock: lock })
    }

    /// `future`, or a `timeout` failure after `--timeout`.
    async fn within<T>(&self, what: &str, future: impl Future<Output = T>) -> anyhow::Result<T> {
        tokio::time::timeout(self.timeout, future)
            .await
            .map_err(|_| fail("timeout", format!("{what}: no answer within {} s", self.timeout.as_secs())))
    }
}

/// A connected device, holding the profile lock.
struct Device {
    messenger: Messenger,
    events: MessengerEvents,
    _lock: ProfileLock,
}

impl Device {
    fn me(&self) -> &UserId {
        &self.messenger.session().user_id
    }

    /// Closes the connection, then lets the messenger finish handling what the server already
    /// handed over (it is acknowledged, so it must reach the store now), for at most `limit`.
    /// `on_event` sees the events still to come.
    async fn close(self, limit: Duration, mut on_event: impl FnMut(MessengerEvent)) {
        let Device { messenger, mut events, _lock } = self;
        let finished = tokio::time::timeout(limit, async move {
            messenger.close().await;
            // The stream ends once every handle is gone: ours now, the messenger's own when
            // it has handled its last event.
            drop(messenger);
            while let Some(event) = events.next().await {
                on_event(event);
            }
        })
        .await;
        if finished.is_err() {
            eprintln!("warning: the connection did not shut down within {} s", limit.as_secs());
        }
    }
}

/// `parley register`.
pub async fn register(ctx: &Ctx, username: &str, password: Option<String>) -> anyhow::Result<()> {
    let password = read_password(password).await?;
    let lock = ctx.profile.create().await?;
    let server = ctx.new_server();
    let (messenger, events, recovery) = ctx
        .within("registering", Messenger::register(server, &ctx.profile.store_path(), username, &password))
        .await?
        .with_context(|| format!("cannot register {username:?} on {server}"))?;
    let device = Device { messenger, events, _lock: lock };
    let session = device.messenger.session().clone();
    let secret = hex(recovery.as_slice());
    ctx.out.record(
        json!({ "user_id": session.user_id, "device_id": session.device_id, "recovery_secret": secret.as_str() }),
        || {
            format!(
                "Registered {} on {} (device {}, profile {:?}).\n\n\
                 RECOVERY SECRET - write it down now and keep it somewhere safe. It is shown only\n\
                 this once and is the only way to add another device to this account\n\
                 (parley login {} --recovery \"SECRET\"):\n\n    {}\n",
                session.user_id,
                session.base_url,
                session.device_id,
                ctx.profile.name(),
                session.user_id.localpart(),
                grouped_hex(recovery.as_slice()).as_str(),
            )
        },
    );
    device.close(ctx.timeout, |_| {}).await;
    Ok(())
}

/// `parley login`.
pub async fn login(ctx: &Ctx, username: &str, recovery: &str, password: Option<String>) -> anyhow::Result<()> {
    let recovery = parse_secret(recovery).map_err(|m| fail("usage", m))?;
    let password = read_password(password).await?;
    let lock = ctx.profile.create().await?;
    let server = ctx.new_server();
    let added = ctx
        .within("signing in", Messenger::add_device(server, &ctx.profile.store_path(), username, &password, &recovery))
        .await?;
    let (messenger, events) = added.map_err(|e| {
        let hint = if matches!(e, MessengerError::Untrusted { .. }) {
            format!("cannot add a device to {username:?}: the recovery secret does not match the account's identity")
        } else {
            format!("cannot sign in as {username:?} on {server}")
        };
        anyhow::Error::new(e).context(hint)
    })?;
    let device = Device { messenger, events, _lock: lock };
    let session = device.messenger.session().clone();
    ctx.out.record(json!({ "user_id": session.user_id, "device_id": session.device_id }), || {
        format!(
            "Signed in as {} on {}; profile {:?} is its new device {}.",
            session.user_id,
            session.base_url,
            ctx.profile.name(),
            session.device_id
        )
    });
    device.close(ctx.timeout, |_| {}).await;
    Ok(())
}

/// `parley send`.
pub async fn send(ctx: &Ctx, user: &str, text: Vec<String>, file: Option<PathBuf>, temporary: bool) -> anyhow::Result<()> {
    let body = match (text.is_empty(), &file) {
        (true, None) => read_body().await?,
        _ => text.join(" "),
    };
    if body.trim().is_empty() && file.is_none() {
        return Err(fail("usage", "the message is empty"));
    }
    if let Some(path) = &file {
        let metadata = tokio::fs::metadata(path).await.with_context(|| format!("cannot read {}", path.display()))?;
        if !metadata.is_file() {
            return Err(fail("usage", format!("{} is not a file", path.display())));
        }
    }
    if is_group(user) {
        if temporary {
            return Err(fail("usage", "--temporary is for 1:1 messages"));
        }
        return group_send(ctx, user, &body, file.as_deref()).await;
    }
    let mut device = ctx.connect().await?;
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        let to = parse_user(user, device.me())?;
        // What arrived while away goes into the history before the new message.
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        ensure_known(ctx, &device.messenger, &to).await?;
        let attachment = match &file {
            Some(path) => Some(upload(ctx, &device.messenger, path).await?),
            None => None,
        };
        let messenger = &device.messenger;
        let outgoing = Outgoing { body: &body, file: attachment, temporary };
        let sent = send_one(ctx, messenger, &mut device.events, &to, outgoing, &mut |e| watcher.handle(e)).await?;
        Ok((to, sent))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let (to, (client_msg_id, server_msg_id)) = result?;
    ctx.out.record(json!({ "client_msg_id": client_msg_id, "server_msg_id": server_msg_id }), || format!("Sent to {to}."));
    Ok(())
}

/// `parley history`.
pub async fn history(ctx: &Ctx, user: &str, limit: u32) -> anyhow::Result<()> {
    if is_group(user) {
        return group_history(ctx, user, limit).await;
    }
    let device = ctx.connect().await?;
    let me = device.me().clone();
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        let peer = parse_user(user, &me)?;
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        let messages = device.messenger.store().history(&peer, limit).await?;
        let queued = outbox_ids(&device.messenger).await?;
        Ok((peer, messages, queued))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let (peer, messages, queued) = result?;
    if messages.is_empty() {
        ctx.out.note(&format!("No messages with {peer} yet."));
    }
    for message in &messages {
        let queued = queued.contains(&message.client_msg_id);
        ctx.out.record(message_json(message, &me, queued), || message_line(message, &me, queued));
    }
    Ok(())
}

/// `parley chat`.
pub async fn chat(ctx: &Ctx, user: &str, last: u32) -> anyhow::Result<()> {
    if is_group(user) {
        return group_chat(ctx, user, last).await;
    }
    let mut device = ctx.connect().await?;
    let me = device.me().clone();
    let peer = match parse_user(user, &me) {
        Ok(peer) => peer,
        Err(e) => {
            device.close(ctx.timeout, |_| {}).await;
            return Err(e);
        }
    };
    let mut watcher = Watcher::chat(ctx.out.clone(), device.messenger.clone(), peer.clone());
    let result = chat_loop(ctx, &mut device, &peer, last, &mut watcher).await;
    // The messenger stops only once every handle on it is gone.
    watcher.release();
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    result
}

async fn chat_loop(ctx: &Ctx, device: &mut Device, peer: &UserId, last: u32, watcher: &mut Watcher) -> anyhow::Result<()> {
    let me = device.me().clone();
    ensure_known(ctx, &device.messenger, peer).await?;
    ctx.out.note(&format!("Chatting with {peer} as {me}. Type a message and press Enter; /quit or Ctrl-D leaves."));
    // First the backlog, so the earlier messages shown include what arrived while away. What
    // it delivered is in the store: take it off the event stream without showing it.
    if let Err(error) =
        ctx.within("fetching new messages", device.messenger.caught_up()).await.and_then(|r| r.map_err(Into::into))
    {
        eprintln!("warning: {}", one_line(&error));
    }
    while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, device.events.next()).await {
        watcher.handle_quietly(event);
    }
    if last > 0 {
        let queued = outbox_ids(&device.messenger).await?;
        for message in device.messenger.store().history(peer, last).await? {
            let queued = queued.contains(&message.client_msg_id);
            watcher.show_stored(&message, queued);
        }
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            event = device.events.next() => match event {
                Some(event) => watcher.handle(event),
                None => return Err(fail("disconnected", "the connection closed")),
            },
            line = lines.next_line() => {
                let Some(line) = line.context("cannot read stdin")? else { break };
                let text = line.trim_end_matches('\r');
                if text.trim() == "/quit" {
                    break;
                }
                if text.trim().is_empty() {
                    continue;
                }
                let Device { messenger, events, .. } = &mut *device;
                match send_one(ctx, messenger, events, peer, Outgoing::text(text), &mut |e| watcher.handle(e)).await {
                    Ok((client_msg_id, server_msg_id)) => ctx.out.json_only(
                        json!({ "event": "sent", "client_msg_id": client_msg_id, "server_msg_id": server_msg_id }),
                    ),
                    Err(error) => report(&ctx.out, &error),
                }
            }
        }
    }
    Ok(())
}

/// `parley devices remove DEVICE_ID`.
pub async fn device_remove(ctx: &Ctx, device_id: &str, password: Option<String>) -> anyhow::Result<()> {
    let device_id: DeviceId = device_id.parse().map_err(|_| fail("usage", format!("{device_id:?} is not a device id")))?;
    let password = read_password(password).await?;
    let device = ctx.connect().await?;
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        let removal = ctx.within("removing the device", device.messenger.remove_device(&device_id, &password)).await?;
        removal.with_context(|| format!("cannot remove device {device_id}"))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let removal = result?;
    let failed: Vec<_> = removal.failed.iter().map(|(group, why)| json!({ "group_id": group, "error": why })).collect();
    ctx.out.record(json!({ "device_id": device_id, "removed_from": removal.removed_from, "failed": failed }), || {
        let mut text = format!("Removed device {device_id}");
        match removal.removed_from.len() {
            0 => text.push('.'),
            _ => {
                let groups = removal.removed_from.iter().map(|g| g.to_string()).collect::<Vec<_>>().join(", ");
                text.push_str(&format!(", and from {groups}."));
            }
        }
        for (group, why) in &removal.failed {
            text.push_str(&format!("\nStill a member of {group} ({why}): the next commit there removes it."));
        }
        text
    });
    Ok(())
}

/// `parley devices`.
pub async fn devices(ctx: &Ctx) -> anyhow::Result<()> {
    let (session, api) = ctx.api().await?;
    let list = ctx.within("listing devices", api.devices()).await?.context("cannot list the devices")?;
    for device in list.devices {
        let current = device.device_id == session.device_id;
        ctx.out.record(
            json!({
                "device_id": device.device_id,
                "display_name": device.display_name,
                "created_ts": device.created_ts,
                "last_seen_ts": device.last_seen_ts,
                "current": current,
            }),
            || {
                let mut line = device.device_id.to_string();
                if let Some(name) = &device.display_name {
                    line.push_str(&format!(" ({})", terminal_safe(name)));
                }
                line.push_str(&format!("  added {} UTC", format_time(device.created_ts)));
                match device.last_seen_ts {
                    Some(ts) => line.push_str(&format!(", last seen {} UTC", format_time(ts))),
                    None => line.push_str(", never connected"),
                }
                if current {
                    line.push_str("  <- this device");
                }
                line
            },
        );
    }
    Ok(())
}

/// `parley verify`.
pub async fn verify(ctx: &Ctx, user: &str) -> anyhow::Result<()> {
    let device = ctx.connect().await?;
    let me = device.me().clone();
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        let peer = parse_user(user, &me)?;
        if peer == me {
            return Err(fail("usage", "verify compares your identity with someone else's (all your devices share one identity)"));
        }
        ctx.within("fetching keys", device.messenger.refresh_devices(&peer)).await?.map_err(|e| peer_error(&peer, e))?;
        let key = match device.messenger.store().pinned_identity_key(&peer).await {
            Ok(Some(key)) => key,
            Ok(None) => return Err(fail("profile", format!("no verified device list of {peer} in the profile"))),
            Err(StoreError::Damaged(_)) => return Err(fail("profile", format!("the stored identity key of {peer} is damaged"))),
            Err(e) => return Err(e.into()),
        };
        let number = safety_number(&me, &device.messenger.identity_key(), &peer, &key);
        Ok((peer, number))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let (peer, number) = result?;
    ctx.out.record(
        json!({ "user_id": me, "peer": peer, "safety_number": number.digits(), "display": number.to_string() }),
        || {
            let blocks: Vec<&str> = number.blocks().collect();
            let rows: Vec<String> = blocks.chunks(4).map(|row| format!("    {}", row.join(" "))).collect();
            format!(
                "Safety number of {me} and {peer}:\n\n{}\n\n\
                 Compare it with the one {peer} sees, in person or over a channel you trust.\n\
                 If both match, nobody is in the middle of your conversation.",
                rows.join("\n")
            )
        },
    );
    Ok(())
}

/// `parley presence`.
pub async fn presence(ctx: &Ctx, user: &str) -> anyhow::Result<()> {
    let (session, api) = ctx.api().await?;
    let peer = parse_user(user, &session.user_id)?;
    let contacts = ctx
        .within("subscribing", api.subscribe_presence(vec![peer.clone()]))
        .await?
        .with_context(|| format!("cannot subscribe to the presence of {peer}"))?;
    let info = match contacts.presence.into_iter().find(|p| p.user == peer) {
        Some(info) => info,
        None => ctx
            .within("fetching presence", api.presence(&peer))
            .await?
            .with_context(|| format!("cannot get the presence of {peer}"))?,
    };
    ctx.out.record(serde_json::to_value(&info)?, || {
        let last_seen = info.last_seen_ts.map(|ts| format!(" (last seen {} UTC)", format_time(ts))).unwrap_or_default();
        match info.status {
            PresenceStatus::Online => format!("{peer} is online."),
            PresenceStatus::Offline => format!("{peer} is offline{last_seen}."),
            PresenceStatus::Hidden => format!("{peer} does not share their presence with you."),
        }
    });
    Ok(())
}

/// `parley whoami`.
pub async fn whoami(ctx: &Ctx) -> anyhow::Result<()> {
    let session = ctx.profile.session().await?;
    ctx.out.record(
        json!({
            "user_id": session.user_id,
            "device_id": session.device_id,
            "server": session.base_url,
            "profile": ctx.profile.name(),
            "profile_dir": ctx.profile.dir(),
        }),
        || {
            format!(
                "{} (device {}) on {}\nprofile {:?} in {}",
                session.user_id,
                session.device_id,
                session.base_url,
                ctx.profile.name(),
                ctx.profile.dir().display()
            )
        },
    );
    Ok(())
}

/// Whether a conversation argument names a group (`!id:server`).
fn is_group(text: &str) -> bool {
    text.trim_start().starts_with('!')
}

/// Parses a group argument: `!id:server`.
fn parse_group(text: &str) -> anyhow::Result<GroupId> {
    let text = text.trim();
    GroupId::parse(text).map_err(|e| fail("usage", format!("{text:?} is not a group id ({e}); expected !id:server")))
}

/// Parses user arguments.
fn parse_users(texts: &[String], me: &UserId) -> anyhow::Result<Vec<UserId>> {
    texts.iter().map(|text| parse_user(text, me)).collect()
}

/// A group by id, from the profile, or an `unknown_group` failure.
async fn known_group(messenger: &Messenger, group_id: &GroupId) -> anyhow::Result<parley_sdk::messenger::GroupRecord> {
    messenger.group(group_id).await?.ok_or_else(|| {
        fail("unknown_group", format!("this device is not in group {group_id} (parley group list shows its groups)"))
    })
}

/// A group's name for people: its name, or its id.
fn group_label(name: Option<&str>, group_id: &GroupId) -> String {
    match name {
        Some(name) => format!("{} ({group_id})", terminal_safe(name)),
        None => group_id.to_string(),
    }
}

/// `parley send` to a group.
async fn group_send(ctx: &Ctx, group: &str, body: &str, file: Option<&Path>) -> anyhow::Result<()> {
    let group_id = parse_group(group)?;
    let device = ctx.connect().await?;
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        known_group(&device.messenger, &group_id).await?;
        let sent = match file {
            Some(path) => {
                let attachment = upload(ctx, &device.messenger, path).await?;
                ctx.within("sending", device.messenger.send_group_attachment(&group_id, &attachment, body)).await?
            }
            None => ctx.within("sending", device.messenger.send_group_text(&group_id, body)).await?,
        };
        sent.with_context(|| format!("not sent to {group_id}"))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let (client_msg_id, group_seq) = result?;
    ctx.out.record(json!({ "group_id": group_id, "client_msg_id": client_msg_id, "group_seq": group_seq }), || {
        format!("Sent to {group_id}.")
    });
    Ok(())
}

/// `parley history` of a group.
async fn group_history(ctx: &Ctx, group: &str, limit: u32) -> anyhow::Result<()> {
    let group_id = parse_group(group)?;
    let device = ctx.connect().await?;
    let me = device.me().clone();
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        let record = known_group(&device.messenger, &group_id).await?;
        Ok((record, device.messenger.group_history(&group_id, limit).await?))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let (record, messages) = result?;
    if messages.is_empty() {
        ctx.out.note(&format!("No messages in {} yet.", group_label(record.name.as_deref(), &group_id)));
    }
    for message in &messages {
        ctx.out.record(group_message_json(message, &me), || group_message_line(message, &me));
    }
    Ok(())
}

/// `parley chat` in a group.
async fn group_chat(ctx: &Ctx, group: &str, last: u32) -> anyhow::Result<()> {
    let group_id = parse_group(group)?;
    let mut device = ctx.connect().await?;
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result = group_chat_loop(ctx, &mut device, &group_id, last, &mut watcher).await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    result
}

async fn group_chat_loop(
    ctx: &Ctx,
    device: &mut Device,
    group_id: &GroupId,
    last: u32,
    watcher: &mut Watcher,
) -> anyhow::Result<()> {
    let me = device.me().clone();
    if let Err(error) =
        ctx.within("fetching new messages", device.messenger.caught_up()).await.and_then(|r| r.map_err(Into::into))
    {
        eprintln!("warning: {}", one_line(&error));
    }
    while let Ok(Some(event)) = tokio::time::timeout(Duration::ZERO, device.events.next()).await {
        watcher.handle_quietly(event);
    }
    let record = known_group(&device.messenger, group_id).await?;
    ctx.out.note(&format!(
        "Chatting in {} as {me}. Type a message and press Enter; /quit or Ctrl-D leaves.",
        group_label(record.name.as_deref(), group_id)
    ));
    if last > 0 {
        for message in device.messenger.group_history(group_id, last).await? {
            let mut value = group_message_json(&message, &me);
            value["event"] = json!("message");
            ctx.out.record(value, || group_message_line(&message, &me));
        }
    }
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            event = device.events.next() => match event {
                Some(MessengerEvent::GroupMessage(message)) if &message.group_id == group_id => {
                    let mut value = group_message_json(&message, &me);
                    value["event"] = json!("message");
                    ctx.out.record(value, || group_message_line(&message, &me));
                }
                Some(MessengerEvent::GroupMembersChanged { group_id: g, added, removed }) if &g == group_id => {
                    ctx.out.record(json!({ "event": "members_changed", "group_id": g, "added": added, "removed": removed }), || {
                        let names = |users: &[UserId]| users.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", ");
                        match (added.is_empty(), removed.is_empty()) {
                            (false, true) => format!("({} joined)", names(&added)),
                            (true, false) => format!("({} left)", names(&removed)),
                            _ => format!("({} joined, {} left)", names(&added), names(&removed)),
                        }
                    });
                }
                Some(MessengerEvent::GroupRenamed { group_id: g, name }) if &g == group_id => {
                    ctx.out.record(json!({ "event": "renamed", "group_id": g, "name": name }), || {
                        format!("(the group is now called {})", terminal_safe(&name))
                    });
                }
                Some(MessengerEvent::GroupRemoved { group_id: g }) if &g == group_id => {
                    watcher.handle(MessengerEvent::GroupRemoved { group_id: g });
                    return Ok(());
                }
                Some(MessengerEvent::GroupMessage(message)) => {
                    ctx.out.note(&format!("(new message in {}: parley chat {0})", message.group_id));
                }
                Some(event) => watcher.handle(event),
                None => return Err(fail("disconnected", "the connection closed")),
            },
            line = lines.next_line() => {
                let Some(line) = line.context("cannot read stdin")? else { break };
                let text = line.trim_end_matches('\r');
                if text.trim() == "/quit" {
                    break;
                }
                if text.trim().is_empty() {
                    continue;
                }
                match ctx.within("sending", device.messenger.send_group_text(group_id, text)).await {
                    Ok(Ok((client_msg_id, group_seq))) => ctx.out.json_only(
                        json!({ "event": "sent", "group_id": group_id, "client_msg_id": client_msg_id, "group_seq": group_seq }),
                    ),
                    Ok(Err(error)) => report(&ctx.out, &anyhow::Error::new(error).context(format!("not sent to {group_id}"))),
                    Err(error) => report(&ctx.out, &error),
                }
            }
        }
    }
    Ok(())
}

/// A group message as JSON.
fn group_message_json(message: &GroupMessage, me: &UserId) -> serde_json::Value {
    let outgoing = &message.sender == me;
    let status = match (outgoing, message.group_seq) {
        (false, _) => None,
        (true, None) => Some("unconfirmed"),
        (true, Some(_)) => Some("sent"),
    };
    json!({
        "group_id": message.group_id,
        "sender": message.sender,
        "sender_device": message.sender_device,
        "outgoing": outgoing,
        "body": message.body,
        "file": message.file.as_ref().map(file_json),
        "ts": message.ts,
        "client_msg_id": message.client_msg_id,
        "group_seq": message.group_seq,
        "status": status,
    })
}

/// A group message for people: time, sender, text; an own message the hub has not confirmed is
/// marked.
fn group_message_line(message: &GroupMessage, me: &UserId) -> String {
    let who = if &message.sender == me { "you".to_owned() } else { terminal_safe(message.sender.as_str()) };
    let status = if &message.sender == me && message.group_seq.is_none() { "  [unconfirmed]" } else { "" };
    let prefix = format!("{}  {who}: ", format_time(message.ts));
    let body = with_file(&message.body, message.file.as_ref(), message.client_msg_id);
    format!("{prefix}{}{status}", indent_body(&body, prefix.chars().count()))
}

/// Prints what adding members came to: devices without a KeyPackage or whose KeyPackage was
/// refused are warnings.
fn print_add_report(report: &AddReport) {
    for device in &report.missing {
        eprintln!("warning: device {} of {} has no KeyPackage on the server; not added", device.device, device.user);
    }
    for (device, reason) in &report.refused {
        eprintln!("warning: device {} of {} not added: {}", device.device, device.user, terminal_safe(reason));
    }
}

fn add_report_json(report: &AddReport) -> serde_json::Value {
    json!({
        "added": report.added,
        "missing": report.missing,
        "refused": report.refused.iter().map(|(d, reason)| json!({ "user": d.user, "device": d.device, "reason": reason })).collect::<Vec<_>>(),
    })
}

/// `parley group create`.
pub async fn group_create(ctx: &Ctx, name: &str, users: &[String]) -> anyhow::Result<()> {
    let name = name.trim();
    if name.is_empty() {
        return Err(fail("usage", "the group name is empty"));
    }
    let device = ctx.connect().await?;
    let me = device.me().clone();
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        let users = parse_users(users, &me)?;
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        for user in &users {
            ensure_known(ctx, &device.messenger, user).await?;
        }
        let created = ctx.within("creating the group", device.messenger.create_group(name, &users)).await?;
        created.context("cannot create the group")
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let (group_id, report) = result?;
    print_add_report(&report);
    let mut value = add_report_json(&report);
    value["group_id"] = json!(group_id);
    value["name"] = json!(name);
    ctx.out.record(value, || {
        format!("Created group {} with {} other device(s): {group_id}", terminal_safe(name), report.added.len())
    });
    Ok(())
}

/// `parley group add`.
pub async fn group_add(ctx: &Ctx, group: &str, users: &[String]) -> anyhow::Result<()> {
    let group_id = parse_group(group)?;
    let device = ctx.connect().await?;
    let me = device.me().clone();
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        let users = parse_users(users, &me)?;
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        known_group(&device.messenger, &group_id).await?;
        for user in &users {
            ensure_known(ctx, &device.messenger, user).await?;
        }
        let added = ctx.within("adding members", device.messenger.add_members(&group_id, &users)).await?;
        added.with_context(|| format!("cannot add to {group_id}"))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let report = result?;
    print_add_report(&report);
    let mut value = add_report_json(&report);
    value["group_id"] = json!(group_id);
    ctx.out.record(value, || match report.added.len() {
        0 => format!("Nobody new to add to {group_id}."),
        n => format!("Added {n} device(s) to {group_id}."),
    });
    Ok(())
}

/// `parley group remove`.
pub async fn group_remove(ctx: &Ctx, group: &str, users: &[String]) -> anyhow::Result<()> {
    let group_id = parse_group(group)?;
    let device = ctx.connect().await?;
    let me = device.me().clone();
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        let users = parse_users(users, &me)?;
        if users.contains(&me) {
            return Err(fail("usage", "you cannot remove yourself: leave the group with `parley group leave`"));
        }
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        known_group(&device.messenger, &group_id).await?;
        let removed = ctx.within("removing members", device.messenger.remove_members(&group_id, &users)).await?;
        Ok((users, removed.with_context(|| format!("cannot remove from {group_id}"))?))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let (users, removed) = result?;
    ctx.out.record(json!({ "group_id": group_id, "users": users, "removed": removed }), || {
        let names = users.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", ");
        if removed {
            format!("Removed {names} from {group_id}.")
        } else {
            format!("None of {names} is a member of {group_id}.")
        }
    });
    Ok(())
}

/// `parley group leave`.
pub async fn group_leave(ctx: &Ctx, group: &str) -> anyhow::Result<()> {
    let group_id = parse_group(group)?;
    let device = ctx.connect().await?;
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result = device.messenger.leave(&group_id).await.with_context(|| format!("cannot leave {group_id}"));
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    result?;
    ctx.out.record(json!({ "group_id": group_id, "leaving": true }), || {
        format!("Leaving {group_id}: the next member to commit removes your devices.")
    });
    Ok(())
}

/// What `parley group set` changes.
pub struct GroupSettings {
    /// A new name.
    pub name: Option<String>,
    /// A new topic ("" clears it).
    pub topic: Option<String>,
    /// The admins.
    pub admins: Option<Vec<String>>,
    /// The member limit (0 clears it).
    pub max_members: Option<u32>,
}

/// `parley group set`.
pub async fn group_set(ctx: &Ctx, group: &str, settings: GroupSettings) -> anyhow::Result<()> {
    use parley_sdk::messenger::MetaChange;
    let group_id = parse_group(group)?;
    let device = ctx.connect().await?;
    let me = device.me().clone();
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        let mut changes = Vec::new();
        if let Some(name) = settings.name {
            changes.push(MetaChange::Name(name));
        }
        if let Some(topic) = settings.topic {
            changes.push(MetaChange::Topic(Some(topic).filter(|t| !t.is_empty())));
        }
        if let Some(admins) = &settings.admins {
            changes.push(MetaChange::Admins(parse_users(admins, &me)?));
        }
        if let Some(max) = settings.max_members {
            changes.push(MetaChange::MaxMembers(Some(max).filter(|m| *m > 0)));
        }
        if changes.is_empty() {
            return Err(fail("usage", "nothing to change: give --name, --topic, --admins or --max-members"));
        }
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        known_group(&device.messenger, &group_id).await?;
        for change in changes {
            let updated = ctx.within("sending the settings", device.messenger.update_group(&group_id, change)).await?;
            updated.with_context(|| format!("cannot change {group_id}"))?;
        }
        let record = device.messenger.group(&group_id).await?.context("the group is gone")?;
        Ok(record)
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let record = result?;
    let policy = &record.policy;
    ctx.out.record(
        json!({
            "group_id": group_id,
            "name": record.name,
            "topic": policy.topic,
            "admins": policy.admins,
            "max_members": policy.max_members,
        }),
        || {
            let admins = policy.admins.iter().map(|u| u.to_string()).collect::<Vec<_>>().join(", ");
            let mut line = format!("{}: admins {admins}", group_label(record.name.as_deref(), &group_id));
            if let Some(topic) = &policy.topic {
                line.push_str(&format!("; topic {}", terminal_safe(topic)));
            }
            if let Some(max) = policy.max_members {
                line.push_str(&format!("; at most {max} devices"));
            }
            line
        },
    );
    Ok(())
}

/// `parley group members`.
pub async fn group_members(ctx: &Ctx, group: &str) -> anyhow::Result<()> {
    let group_id = parse_group(group)?;
    let device = ctx.connect().await?;
    let (me, my_device) = (device.me().clone(), device.messenger.session().device_id.clone());
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        let record = known_group(&device.messenger, &group_id).await?;
        Ok((record, device.messenger.group_members(&group_id).await?))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let (record, members) = result?;
    ctx.out.note(&format!("Members of {}:", group_label(record.name.as_deref(), &group_id)));
    for (user, member_device) in &members {
        let current = user == &me && member_device == &my_device;
        ctx.out.record(json!({ "group_id": group_id, "user": user, "device": member_device, "current": current }), || {
            let marker = if current { "  <- this device" } else { "" };
            format!("{user}  device {member_device}{marker}")
        });
    }
    Ok(())
}

/// `parley group list`.
pub async fn group_list(ctx: &Ctx) -> anyhow::Result<()> {
    let device = ctx.connect().await?;
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        Ok(device.messenger.groups().await?)
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let groups = result?;
    if groups.is_empty() {
        ctx.out.note("No groups yet (parley group create NAME USER... makes one).");
    }
    for group in &groups {
        ctx.out.record(
            json!({
                "group_id": group.group_id,
                "name": group.name,
                "state": group.state.as_str(),
                "problem": group.problem,
                "epoch": group.epoch,
                "last_ts": group.last_ts,
            }),
            || {
                let mut line = format!("{}  {}", format_time(group.last_ts), group_label(group.name.as_deref(), &group.group_id));
                if group.state != parley_sdk::messenger::GroupState::Active {
                    line.push_str(&format!("  [{}]", group.state));
                }
                if let Some(problem) = &group.problem {
                    line.push_str(&format!(": {}", terminal_safe(problem)));
                }
                line
            },
        );
    }
    Ok(())
}

/// `parley chats`.
pub async fn chats(ctx: &Ctx) -> anyhow::Result<()> {
    let device = ctx.connect().await?;
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        Ok(device.messenger.store().conversations().await?)
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let conversations = result?;
    if conversations.is_empty() {
        ctx.out.note("No conversations yet.");
    }
    for chat in &conversations {
        let group = chat.id.starts_with('!');
        ctx.out.record(
            json!({
                "id": chat.id,
                "kind": if group { "group" } else { "user" },
                "name": chat.name,
                "last_ts": chat.last_ts,
                "last_body": chat.last_body,
            }),
            || {
                let name = chat.name.as_deref().map(|n| format!(" ({})", terminal_safe(n))).unwrap_or_default();
                let preview = chat.last_body.as_deref().map(preview).unwrap_or_default();
                format!("{}  {}{name}  {preview}", format_time(chat.last_ts), terminal_safe(&chat.id))
            },
        );
    }
    Ok(())
}

/// The start of a message's first line, for a list.
fn preview(body: &str) -> String {
    const MAX: usize = 60;
    let line = body.lines().next().unwrap_or_default();
    let mut text: String = line.chars().take(MAX).collect();
    if line.chars().count() > MAX || body.lines().nth(1).is_some() {
        text.push('…');
    }
    terminal_safe(&text)
}

/// Sends `body` to `to` and waits (up to `--timeout`) for the server to store it; other events
/// go to `others`. A message that failed for good is taken out of the outbox (the user was
/// told it was not sent); one that failed for a passing reason stays queued for the next
/// connection.
async fn send_one(
    ctx: &Ctx,
    messenger: &Messenger,
    events: &mut MessengerEvents,
    to: &UserId,
    outgoing: Outgoing<'_>,
    others: &mut dyn FnMut(MessengerEvent),
) -> anyhow::Result<(Uuid, ServerMsgId)> {
    let Outgoing { body, file, temporary } = outgoing;
    let deadline = Instant::now() + ctx.timeout;
    let queued = || {
        format!(
            "no answer from the server within {} s; the message stays queued and goes out the next time this profile connects",
            ctx.timeout.as_secs()
        )
    };
    let before: HashSet<Uuid> = messenger.store().outbox().await?.into_iter().map(|e| e.client_msg_id).collect();
    let sending = async {
        match &file {
            Some(file) => messenger.send_uploaded_file(to, file.clone(), body, temporary).await,
            None => messenger.send_text(to, body).await,
        }
    };
    let client_msg_id = match tokio::time::timeout_at(deadline, sending).await {
        Err(_) => return Err(fail("timeout", queued())),
        Ok(Ok(id)) => id,
        Ok(Err(error)) => {
            if matches!(&error, MessengerError::Sdk(e) if e.is_transient()) {
                return Err(anyhow::Error::new(error)
                    .context("not sent yet; the message stays queued and goes out the next time this profile connects"));
            }
            for entry in messenger.store().outbox().await? {
                if !before.contains(&entry.client_msg_id) && entry.to == *to && entry.body == body && entry.file == file {
                    messenger.store().dequeue(entry.client_msg_id).await?;
                }
            }
            return Err(anyhow::Error::new(error).context(format!("not sent to {to}")));
        }
    };
    loop {
        match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => return Err(fail("timeout", queued())),
            Ok(None) => return Err(fail("disconnected", "the connection closed before the server answered")),
            Ok(Some(MessengerEvent::Sent { client_msg_id: id, server_msg_id })) if id == client_msg_id => {
                return Ok((client_msg_id, server_msg_id))
            }
            Ok(Some(other)) => others(other),
        }
    }
}

/// A message to send: a text, or a file just uploaded with its caption.
struct Outgoing<'a> {
    body: &'a str,
    file: Option<Attachment>,
    /// A temporary chat's file (`--temporary`).
    temporary: bool,
}

impl<'a> Outgoing<'a> {
    fn text(body: &'a str) -> Self {
        Self { body, file: None, temporary: false }
    }
}

/// Makes sure `user` exists and has a verified device list before anything is queued for
/// them (a message to a user who does not exist would otherwise wait in the outbox forever).
async fn ensure_known(ctx: &Ctx, messenger: &Messenger, user: &UserId) -> anyhow::Result<()> {
    if messenger.store().pinned_identity_key(user).await?.is_some() {
        return Ok(());
    }
    ctx.within("fetching keys", messenger.refresh_devices(user)).await?.map_err(|e| peer_error(user, e))?;
    Ok(())
}

/// Explains a failure to get `user`'s keys.
fn peer_error(user: &UserId, error: MessengerError) -> anyhow::Error {
    let code = match &error {
        MessengerError::Sdk(e) => e.server_code(),
        _ => None,
    };
    let context = match code {
        Some(ErrorCode::UnknownUser) => format!("no such user: {user}"),
        Some(ErrorCode::NotFound) => format!("{user} has not set up end-to-end encryption"),
        _ => format!("cannot get the keys of {user}"),
    };
    anyhow::Error::new(error).context(context)
}

/// Parses a user argument: `@name:server`, or `name` for a user of the own server.
fn parse_user(text: &str, me: &UserId) -> anyhow::Result<UserId> {
    let text = text.trim();
    let full = if text.starts_with('@') || text.contains(':') { text.to_owned() } else { format!("@{text}:{}", me.server()) };
    UserId::parse(&full).map_err(|e| fail("usage", format!("{text:?} is not a user ({e}); expected @name:server or a name")))
}

/// Whether two server URLs name the same server.
fn same_server(a: &str, b: &str) -> bool {
    match (url::Url::parse(a), url::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.as_str().trim_end_matches('/') == b.as_str().trim_end_matches('/'),
        _ => a.trim_end_matches('/') == b.trim_end_matches('/'),
    }
}

/// The ids of the messages waiting in the outbox.
async fn outbox_ids(messenger: &Messenger) -> anyhow::Result<HashSet<Uuid>> {
    Ok(messenger.store().outbox().await?.into_iter().map(|e| e.client_msg_id).collect())
}

/// How far one of our messages got (`None` for someone else's): `queued` (waiting in the
/// outbox), `failed` (never stored by the server), `sent`, `delivered` or `read`.
fn status(message: &StoredMessage, me: &UserId, queued: bool) -> Option<&'static str> {
    if &message.sender != me {
        return None;
    }
    Some(match (message.server_msg_id, message.delivered, message.read) {
        (None, ..) if queued => "queued",
        (None, ..) => "failed",
        (Some(_), _, true) => "read",
        (Some(_), true, false) => "delivered",
        (Some(_), false, false) => "sent",
    })
}

/// A stored message as JSON.
fn message_json(message: &StoredMessage, me: &UserId, queued: bool) -> serde_json::Value {
    json!({
        "peer": message.peer,
        "sender": message.sender,
        "sender_device": message.sender_device,
        "outgoing": &message.sender == me,
        "body": message.body,
        "file": message.file.as_ref().map(file_json),
        "ts": message.ts,
        "client_msg_id": message.client_msg_id,
        "server_msg_id": message.server_msg_id,
        "delivered": message.delivered,
        "read": message.read,
        "status": status(message, me, queued),
    })
}

/// A stored message for people: time, sender, text, and for our own messages how far it got.
fn message_line(message: &StoredMessage, me: &UserId, queued: bool) -> String {
    let status = status(message, me, queued);
    let who = if status.is_some() { "you".to_owned() } else { terminal_safe(message.sender.as_str()) };
    let status = status.map(|s| format!("  [{s}]")).unwrap_or_default();
    let prefix = format!("{}  {who}: ", format_time(message.ts));
    let body = with_file(&message.body, message.file.as_ref(), message.client_msg_id);
    format!("{prefix}{}{status}", indent_body(&body, prefix.chars().count()))
}

/// An attachment as JSON: what it is, never its key.
fn file_json(file: &Attachment) -> serde_json::Value {
    json!({
        "name": file.name,
        "mime": file.media.mime,
        "size": file.media.size,
        "server": file.server,
        "media_id": file.media_id,
        "dimensions": file.dimensions,
        "thumbnail_bytes": file.thumbnail.as_ref().map(|t| t.data.0.len()),
    })
}

/// A message's text for people, with its file (if any) on a line of its own first.
fn with_file(body: &str, file: Option<&Attachment>, client_msg_id: Uuid) -> String {
    let Some(file) = file else { return body.to_owned() };
    let name = file.name.as_deref().map_or_else(|| "(no name)".to_owned(), terminal_safe);
    let dimensions = file.dimensions.map(|(w, h)| format!(", {w}x{h}")).unwrap_or_default();
    let id = client_msg_id.simple().to_string();
    let line = format!(
        "[file {name}, {}, {}{dimensions}; parley download … {}]",
        human_bytes(file.media.size),
        terminal_safe(&file.media.mime),
        &id[..8]
    );
    if body.is_empty() {
        line
    } else {
        format!("{line}\n{body}")
    }
}

/// A byte count for people.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A progress bar on stderr for a transfer (none with `--json` or when stderr is not a
/// terminal); the callback the SDK calls with bytes done and in all.
fn progress_bar(out: &Out, what: String) -> (indicatif::ProgressBar, impl FnMut(u64, u64) -> ControlFlow<()> + Send) {
    let bar = if out.is_json() || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        let bar = indicatif::ProgressBar::new(0);
        let style = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .map(|style| style.progress_chars("=> "))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
        bar.set_style(style);
        bar
    };
    bar.set_message(what);
    let handle = bar.clone();
    (bar, move |done, total| {
        handle.set_length(total);
        handle.set_position(done);
        ControlFlow::Continue(())
    })
}

/// Uploads `path` with a progress bar: an interrupted upload resumes the next time.
async fn upload(ctx: &Ctx, messenger: &Messenger, path: &Path) -> anyhow::Result<Attachment> {
    let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    let (bar, progress) = progress_bar(&ctx.out, format!("uploading {}", terminal_safe(&name)));
    let uploaded = messenger.upload(path, progress).await;
    bar.finish_and_clear();
    uploaded.map_err(|e| {
        let hint = if matches!(e, MessengerError::Sdk(ref s) if s.is_transient()) {
            format!("upload of {} interrupted; run the same command again to resume it", path.display())
        } else {
            format!("cannot upload {}", path.display())
        };
        anyhow::Error::new(e).context(hint)
    })
}

/// `parley download`.
pub async fn download(ctx: &Ctx, user: &str, message: &str, out: Option<PathBuf>, force: bool) -> anyhow::Result<()> {
    let prefix = message.trim().to_ascii_lowercase().replace('-', "");
    if prefix.is_empty() || !prefix.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(fail("usage", format!("{message:?} is not a message id (hex digits, as `history` shows them)")));
    }
    let device = ctx.connect().await?;
    let me = device.me().clone();
    let mut watcher = Watcher::quiet(ctx.out.clone());
    let result: anyhow::Result<_> = async {
        ctx.within("fetching new messages", device.messenger.caught_up()).await??;
        let files: Vec<(Uuid, Attachment)> = if is_group(user) {
            let group_id = parse_group(user)?;
            known_group(&device.messenger, &group_id).await?;
            let history = device.messenger.group_history(&group_id, u32::MAX).await?;
            history.into_iter().filter_map(|m| Some((m.client_msg_id, m.file?))).collect()
        } else {
            let peer = parse_user(user, &me)?;
            let history = device.messenger.store().history(&peer, u32::MAX).await?;
            history.into_iter().filter_map(|m| Some((m.client_msg_id, m.file?))).collect()
        };
        let mut matching = files.into_iter().filter(|(id, _)| id.simple().to_string().starts_with(&prefix));
        let Some((client_msg_id, file)) = matching.next() else {
            return Err(fail("not_found", format!("no message with a file and id {message} in the conversation with {user}")));
        };
        if matching.any(|(id, _)| id != client_msg_id) {
            return Err(fail("usage", format!("{message} names more than one message; give more of its id")));
        }
        let dest = destination(out.as_deref(), &file)?;
        if !force && tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            return Err(fail("exists", format!("{} exists; use --force to overwrite it, or --out", dest.display())));
        }
        let shown = dest.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let (bar, progress) = progress_bar(&ctx.out, format!("downloading {}", terminal_safe(&shown)));
        let downloaded = device.messenger.download(&file, &dest, progress).await;
        bar.finish_and_clear();
        downloaded.map_err(|e| {
            let hint = if matches!(e, MessengerError::Sdk(ref s) if s.is_transient()) {
                "download interrupted; run the same command again to resume it".to_owned()
            } else {
                format!("cannot download the file of message {client_msg_id}")
            };
            anyhow::Error::new(e).context(hint)
        })?;
        Ok((client_msg_id, file, dest))
    }
    .await;
    device.close(ctx.timeout, |e| watcher.handle(e)).await;
    let (client_msg_id, file, dest) = result?;
    ctx.out.record(
        json!({ "client_msg_id": client_msg_id, "path": dest, "size": file.media.size, "mime": file.media.mime }),
        || format!("Saved {} ({}).", dest.display(), human_bytes(file.media.size)),
    );
    Ok(())
}

/// Where a download goes: `out` (a file, or a directory for the file's own name), or the
/// file's own name in the current directory. The name a sender chose is reduced to one plain
/// path component: it cannot point elsewhere.
fn destination(out: Option<&Path>, file: &Attachment) -> anyhow::Result<PathBuf> {
    let own_name = || {
        let name = file.name.as_deref().and_then(|n| Path::new(n).file_name()).and_then(|n| n.to_str()).unwrap_or("");
        let name: String = name.chars().filter(|c| !c.is_control() && *c != '/' && *c != '\\').collect();
        let name = name.trim().trim_start_matches('.');
        if name.is_empty() {
            let extension = mime_extension(&file.media.mime);
            format!("parley-{}{extension}", &file.media_id[..file.media_id.len().min(12)])
        } else {
            name.to_owned()
        }
    };
    Ok(match out {
        Some(path) if path.is_dir() => path.join(own_name()),
        Some(path) => path.to_path_buf(),
        None => PathBuf::from(own_name()),
    })
}

/// A file name extension for a MIME type (with its dot), or none.
fn mime_extension(mime: &str) -> String {
    match mime {
        "image/jpeg" => ".jpg".to_owned(),
        "image/png" => ".png".to_owned(),
        "image/gif" => ".gif".to_owned(),
        "image/webp" => ".webp".to_owned(),
        "application/pdf" => ".pdf".to_owned(),
        "text/plain" => ".txt".to_owned(),
        _ => String::new(),
    }
}

/// Handles the messenger's events while a command runs: warnings always (on stderr), and in
/// `chat` the conversation's messages and receipts.
struct Watcher {
    out: Out,
    chat: Option<ChatView>,
}

/// What `chat` needs to show a conversation live.
struct ChatView {
    /// For read receipts; `None` once the chat is closing.
    messenger: Option<Messenger>,
    me: UserId,
    peer: UserId,
    /// Messages already shown from the store, by (sender, client_msg_id).
    shown: HashSet<(UserId, Uuid)>,
}

impl Watcher {
    /// Warnings only.
    fn quiet(out: Out) -> Self {
        Self { out, chat: None }
    }

    /// Shows the conversation with `peer` and marks its messages read.
    fn chat(out: Out, messenger: Messenger, peer: UserId) -> Self {
        let me = messenger.session().user_id.clone();
        Self { out, chat: Some(ChatView { messenger: Some(messenger), me, peer, shown: HashSet::new() }) }
    }

    /// Lets go of the messenger (so that it can stop); no more read receipts are sent.
    fn release(&mut self) {
        if let Some(chat) = &mut self.chat {
            chat.messenger = None;
        }
    }

    /// Shows a message from the store (the lead-in of `chat`).
    fn show_stored(&mut self, message: &StoredMessage, queued: bool) {
        if let Some(chat) = &mut self.chat {
            chat.shown.insert((message.sender.clone(), message.client_msg_id));
            let me = &chat.me;
            let mut value = message_json(message, me, queued);
            value["event"] = json!("message");
            self.out.record(value, || message_line(message, me, queued));
        }
    }

    /// An event whose messages are in the store already and are not to be shown.
    fn handle_quietly(&mut self, event: MessengerEvent) {
        if !matches!(event, MessengerEvent::Message(_)) {
            self.handle(event);
        }
    }

    fn handle(&mut self, event: MessengerEvent) {
        match event {
            MessengerEvent::Untrusted { user, reason } => {
                let reason = reason.to_string();
                eprintln!("warning: the keys of {user} cannot be trusted: {}", terminal_safe(&reason));
                self.event(json!({ "event": "untrusted", "user": user, "reason": reason }));
            }
            MessengerEvent::GroupProblem { group_id, reason } => {
                let reason = reason.to_string();
                eprintln!("warning: group {group_id}: {}", terminal_safe(&reason));
                self.event(json!({ "event": "group_problem", "group_id": group_id, "reason": reason }));
            }
            MessengerEvent::GroupRemoved { group_id } => {
                eprintln!("note: you were removed from group {group_id}");
                self.event(json!({ "event": "group_removed", "group_id": group_id }));
            }
            MessengerEvent::Undecryptable { sender, device, reason } => {
                let reason = reason.to_string();
                eprintln!(
                    "warning: a message from {sender} (device {device}) could not be decrypted: {}",
                    terminal_safe(&reason)
                );
                self.event(json!({ "event": "undecryptable", "sender": sender, "device": device, "reason": reason }));
            }
            other => self.show(other),
        }
    }

    /// A JSON-only event line, in `chat`.
    fn event(&self, value: serde_json::Value) {
        if self.chat.is_some() {
            self.out.json_only(value);
        }
    }

    fn show(&mut self, event: MessengerEvent) {
        let Some(chat) = &mut self.chat else { return };
        let me = chat.me.clone();
        match event {
            MessengerEvent::Message(message) if message.peer == chat.peer => {
                if chat.shown.remove(&(message.sender.clone(), message.client_msg_id)) {
                    return;
                }
                let mut value = message_json(&message, &me, false);
                value["event"] = json!("message");
                self.out.record(value, || message_line(&message, &me, false));
                if message.sender != me {
                    if let (Some(id), Some(messenger)) = (message.server_msg_id, &chat.messenger) {
                        let (messenger, peer) = (messenger.clone(), chat.peer.clone());
                        tokio::spawn(async move {
                            let _ = messenger.mark_read(&peer, vec![id]).await;
                        });
                    }
                }
            }
            MessengerEvent::Message(message) => {
                self.out.note(&format!("(new message from {}: parley chat {0})", terminal_safe(message.peer.as_str())));
            }
            MessengerEvent::Sent { client_msg_id, server_msg_id } => {
                self.event(json!({ "event": "sent", "client_msg_id": client_msg_id, "server_msg_id": server_msg_id }));
            }
            MessengerEvent::Delivered { by, message_ids } if by == chat.peer => {
                self.event(json!({ "event": "delivered", "by": by, "message_ids": message_ids }));
            }
            MessengerEvent::Read { by, message_ids } if by == chat.peer => {
                self.event(json!({ "event": "read", "by": by, "message_ids": message_ids }));
            }
            MessengerEvent::DevicesChanged { user, added, removed } if user == chat.peer || user == me => {
                self.out.record(json!({ "event": "devices_changed", "user": user, "added": added, "removed": removed }), || {
                    format!("({user} now has {} new and {} removed device(s))", added.len(), removed.len())
                });
            }
            _ => {}
        }
    }
}

/// The password: `given`, or the first line of stdin (not echoed when stdin is a terminal).
async fn read_password(given: Option<String>) -> anyhow::Result<Zeroizing<String>> {
    let password = match given {
        Some(password) => Zeroizing::new(password),
        None => {
            let terminal = std::io::stdin().is_terminal();
            let echo = if terminal {
                eprint!("Password: ");
                EchoOff::new()
            } else {
                None
            };
            let mut line = Zeroizing::new(String::new());
            let mut stdin = BufReader::new(tokio::io::stdin());
            let read = tokio::select! {
                read = stdin.read_line(&mut line) => read.map(|_| ()),
                _ = tokio::signal::ctrl_c() => Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "interrupted")),
            };
            drop(echo);
            if terminal {
                eprintln!();
            }
            read.context("cannot read the password from stdin")?;
            Zeroizing::new(line.trim_end_matches(['\n', '\r']).to_owned())
        }
    };
    if password.is_empty() {
        return Err(fail("usage", "empty password: give it on the first line of stdin, with --password or with PARLEY_PASSWORD"));
    }
    Ok(password)
}

/// Terminal echo switched off (with `stty`) while it lives.
struct EchoOff;

impl EchoOff {
    /// Switches echo off; `None` when that is not possible (the password then shows).
    fn new() -> Option<Self> {
        let ok = std::process::Command::new("stty")
            .arg("-echo")
            .stdin(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Self)
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        let _ = std::process::Command::new("stty").arg("echo").stdin(std::process::Stdio::inherit()).status();
    }
}

/// A message body from stdin (for `parley send USER` without text).
async fn read_body() -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        eprintln!("Type the message, then press Ctrl-D:");
    }
    let mut body = String::new();
    tokio::io::stdin().read_to_string(&mut body).await.context("cannot read the message from stdin")?;
    Ok(body.trim_end_matches(['\n', '\r']).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_arguments() {
        let me = UserId::parse("@alice:example.org").unwrap();
        assert_eq!(parse_user("bob", &me).unwrap().as_str(), "@bob:example.org");
        assert_eq!(parse_user("@bob:other.net", &me).unwrap().as_str(), "@bob:other.net");
        assert!(parse_user("Bob!", &me).is_err());
        assert!(parse_user("bob:other.net", &me).is_err());
    }

    #[test]
    fn group_arguments() {
        assert!(is_group("!abc:example.org") && is_group(" !abc:example.org"));
        assert!(!is_group("@bob:example.org"));
        assert_eq!(parse_group("!abc:example.org").unwrap().to_string(), "!abc:example.org");
        assert!(parse_group("!:example.org").is_err());
        assert!(parse_group("!abc").is_err());
        assert_eq!(preview("hello\nworld"), "hello…");
        assert_eq!(preview("short"), "short");
    }

    #[test]
    fn servers_compare_as_urls() {
        assert!(same_server("http://127.0.0.1:8008", "http://127.0.0.1:8008/"));
        assert!(same_server("HTTP://Example.org", "http://example.org"));
        assert!(!same_server("http://127.0.0.1:8008", "http://127.0.0.1:8009"));
    }
}
