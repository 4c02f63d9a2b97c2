//! Helpers for SDK-driven tests: users, devices, envelopes, and waiting on events with a timeout.

use anyhow::{bail, Context as _};
use parley_sdk::{
    Api, Client, ConnectOptions, Connection, Envelope, Event, Events, LoginRequest, MessageEvent, ReceiptEvent, ReceiptKind,
    RegisterRequest, Session, UserId,
};
use std::time::Duration;

pub const T: Duration = Duration::from_secs(20);
pub const PASSWORD: &str = "correct horse";

pub async fn register(base: &str, name: &str) -> anyhow::Result<Session> {
    Ok(Client::new(base)?.register(RegisterRequest::new(name, PASSWORD)).await?)
}

pub async fn login(base: &str, name: &str) -> anyhow::Result<Session> {
    Ok(Client::new(base)?.login(LoginRequest::new(name, PASSWORD)).await?)
}

/// A connected device.
pub struct Device {
    pub session: Session,
    pub conn: Connection,
    pub events: Events,
    /// Events that arrived before `caught_up` (the backlog), handed out first.
    backlog: std::collections::VecDeque<Event>,
}

impl Device {
    pub async fn connect(session: &Session) -> anyhow::Result<Self> {
        Self::connect_with(session, ConnectOptions::default()).await
    }

    pub async fn connect_with(session: &Session, options: ConnectOptions) -> anyhow::Result<Self> {
        let (conn, mut events) = Connection::open(session, options).await?;
        // Wait until the backlog is through, so the test starts from a known state; keep the
        // backlog's events for the test.
        let mut backlog = std::collections::VecDeque::new();
        next_matching(&mut events, T, |e| match e {
            Event::CaughtUp { .. } => Some(()),
            other => {
                backlog.push_back(other);
                None
            }
        })
        .await?;
        Ok(Self { session: session.clone(), conn, events, backlog })
    }

    /// The next event `pick` accepts (backlog first), skipping others.
    pub async fn next<T>(&mut self, mut pick: impl FnMut(Event) -> Option<T>) -> anyhow::Result<T> {
        while let Some(event) = self.backlog.pop_front() {
            if let Some(found) = pick(event) {
                return Ok(found);
            }
        }
        next_matching(&mut self.events, T, pick).await
    }

    /// An event already received, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        self.backlog.pop_front().or_else(|| self.events.try_next())
    }

    /// Sends `text` to `to`, addressed to every current device (as a real client would).
    pub async fn send_text(&self, to: &UserId, text: &str) -> anyhow::Result<parley_sdk::SentResponse> {
        let envelopes = envelopes(&self.session, to, text.as_bytes()).await?;
        Ok(self.conn.send(to.clone(), envelopes).await?)
    }

    pub async fn next_message(&mut self) -> anyhow::Result<MessageEvent> {
        self.next(|e| match e {
            Event::Message(m) => Some(m),
            _ => None,
        })
        .await
    }

    pub async fn next_receipt(&mut self, kind: ReceiptKind) -> anyhow::Result<ReceiptEvent> {
        self.next(|e| match e {
            Event::Receipt(r) if r.kind == kind => Some(r),
            _ => None,
        })
        .await
    }
}

/// One envelope per device of `to` and per other device of the sender; the "ciphertext" is the
/// plaintext here (end-to-end encryption is a later issue; the server treats it as opaque).
pub async fn envelopes(sender: &Session, to: &UserId, body: &[u8]) -> anyhow::Result<Vec<Envelope>> {
    let api = Api::new(sender)?;
    let mut out = Vec::new();
    for device in api.user_devices(to).await?.devices {
        // Never the sending device itself (also for a note to self).
        if !(to == &sender.user_id && device == sender.device_id) {
            out.push(Envelope::new(to.clone(), device, body.to_vec()));
        }
    }
    if to != &sender.user_id {
        for device in api.user_devices(&sender.user_id).await?.devices {
            if device != sender.device_id {
                out.push(Envelope::new(sender.user_id.clone(), device, body.to_vec()));
            }
        }
    }
    Ok(out)
}

/// The first event `pick` accepts, skipping others; fails after `timeout`.
pub async fn next_matching<T>(
    events: &mut Events,
    timeout: Duration,
    mut pick: impl FnMut(Event) -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let event = tokio::time::timeout_at(deadline, events.next()).await.context("timed out waiting for an event")?;
        let Some(event) = event else { bail!("event stream ended") };
        if let Some(found) = pick(event) {
            return Ok(found);
        }
    }
}

pub fn text(message: &MessageEvent) -> String {
    String::from_utf8_lossy(&message.ciphertext.0).into_owned()
}

/// How long [`receive_texts`] waits for a batch of messages to arrive.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(120);

/// A device that sees every message event the server sends: no SDK dedupe, no acks (so the
/// server keeps every inbox row and sends no delivered receipts back).
pub(crate) async fn raw_receiver(session: &Session) -> anyhow::Result<Device> {
    let options = ConnectOptions { dedupe_window: 0, manual_ack: true, ..ConnectOptions::default() };
    Device::connect_with(session, options).await
}

/// The texts of the next `count` messages, in arrival order.
pub(crate) async fn receive_texts(device: &mut Device, count: usize) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::with_capacity(count);
    let deadline = tokio::time::Instant::now() + RECEIVE_TIMEOUT;
    while texts.len() < count {
        let event = tokio::time::timeout_at(deadline, device.next(Some))
            .await
            .with_context(|| format!("timed out after {} of {count} messages", texts.len()))??;
        if let Event::Message(m) = event {
            texts.push(text(&m));
        }
    }
    Ok(texts)
}

/// Sends each text as one message from `sender` to `to`, addressed like `template` (the
/// recipient's devices as `support::envelopes` found them), waiting for each `sent`.
pub(crate) async fn send_texts(sender: &Device, to: &UserId, template: &[Envelope], texts: &[String]) -> anyhow::Result<()> {
    for text in texts {
        let envelopes =
            template.iter().map(|e| Envelope::new(e.user.clone(), e.device.clone(), text.as_bytes().to_vec())).collect();
        sender.conn.send(to.clone(), envelopes).await.with_context(|| format!("sending {:.20}", text))?;
    }
    Ok(())
}
