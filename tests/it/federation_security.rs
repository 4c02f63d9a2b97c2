//! The federation listener against a hostile or confused peer: hand-made HTTPS requests with
//! missing, malformed, forged, altered, stale, misdirected and replayed signatures, items
//! impersonating users of other servers, a denied server, and a transaction resent with a new
//! signature. None of them may deliver anything or change what a legitimate message does next.

use crate::support::{self, Device};
use crate::support::{raw_receiver, receive_texts, send_texts};
use anyhow::{ensure, Context as _};
use parley_federation::message::sign_message;
use parley_federation::{ServerKey, SignedParts};
use parley_sdk::Event;
use parley_spec::federation::v1::transaction::{FedEnvelope, Item, SignedMessage, Transaction, TypingItem};
use parley_spec::{DeviceId, ServerMsgId, ServerName, Timestamp, UserId};
use parley_tests::fednet::{Discovery, FedNet};
use parley_tests::{Mode, TestServer};
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

const TEN_MINUTES: Duration = Duration::from_secs(10 * 60);

fn server_name(name: &str) -> anyhow::Result<ServerName> {
    ServerName::parse(name).with_context(|| format!("bad server name {name}"))
}

fn send_path(txn_id: &str) -> String {
    format!("/_parley/federation/v1/send/{txn_id}")
}

/// A server's signing key, read from its data directory (to sign as that server).
fn key_of(server: &TestServer) -> anyhow::Result<ServerKey> {
    Ok(ServerKey::load_or_create(&server.data_dir().join("server.key"))?)
}

/// The `Authorization` header of a request signed with `key` under `key_id`.
#[allow(clippy::too_many_arguments)]
fn sign(
    key: &ServerKey,
    key_id: &str,
    origin: &str,
    destination: &str,
    method: &str,
    uri: &str,
    ts: Timestamp,
    body: &[u8],
) -> anyhow::Result<String> {
    let (origin, destination) = (server_name(origin)?, server_name(destination)?);
    Ok(SignedParts::new(method, uri, &origin, &destination, ts, body).authorization(key_id, &key.key))
}

/// A transaction body from `origin` with `items`.
fn transaction(origin: &str, items: Vec<Item>) -> anyhow::Result<Vec<u8>> {
    Ok(serde_json::to_vec(&Transaction::new(server_name(origin)?, Timestamp::now(), items))?)
}

/// Talks HTTPS to one server's federation listener, as another server would.
struct Peer {
    http: reqwest::Client,
    base: String,
}

impl Peer {
    fn new(net: &FedNet, name: &str, server: &TestServer) -> anyhow::Result<Self> {
        let addr = server.federation_addr.context("federation listener address")?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(net.ca.cert_pem().as_bytes())?)
            .resolve(name, addr)
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self { http, base: format!("https://{name}:{}", addr.port()) })
    }

    /// Status and JSON body (`Null` when empty) of a request.
    async fn request(&self, method: Method, path: &str, auth: Option<&str>, body: &[u8]) -> anyhow::Result<(u16, Value)> {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(auth) = auth {
            request = request.header(reqwest::header::AUTHORIZATION, auth);
        }
        if !body.is_empty() {
            request = request.header(reqwest::header::CONTENT_TYPE, "application/json").body(body.to_vec());
        }
        let response = request.send().await?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await?;
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).with_context(|| format!("{status}: {}", String::from_utf8_lossy(&bytes)))?
        };
        Ok((status, json))
    }

    async fn put_send(&self, txn_id: &str, auth: Option<&str>, body: &[u8]) -> anyhow::Result<(u16, Value)> {
        self.request(Method::PUT, &send_path(txn_id), auth, body).await
    }
}

/// Mismatches between expected and actual answers, reported all at once.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    /// Records a mismatch unless the answer has `status` and one of `codes`.
    fn expect(&mut self, case: &str, answer: &(u16, Value), status: u16, codes: &[&str]) {
        let code = answer.1["code"].as_str().unwrap_or("<none>");
        if answer.0 != status || !codes.contains(&code) {
            self.0.push(format!("{case}: expected {status} {codes:?}, got {} {}", answer.0, answer.1));
        }
    }

    fn check(self) {
        assert!(self.0.is_empty(), "{} case(s) answered wrongly:\n{}", self.0.len(), self.0.join("\n"));
    }
}

/// A message from `sender` (claimed by `origin`) to `to`'s `device`, signed by `key`.
#[allow(clippy::too_many_arguments)]
fn message(
    id: u64,
    sender: &str,
    sender_device: &DeviceId,
    to: &UserId,
    device: &DeviceId,
    text: &str,
    origin: &str,
    key: &ServerKey,
) -> anyhow::Result<SignedMessage> {
    let mut message = SignedMessage::new(
        ServerMsgId::new(id),
        UserId::parse(sender)?,
        sender_device.clone(),
        to.clone(),
        Timestamp::now(),
        vec![FedEnvelope::new(device.clone(), text.as_bytes().to_vec())],
        server_name(origin)?,
        String::new(),
    );
    sign_message(&mut message, key);
    Ok(message)
}

/// The next message or typing notice `device` receives; fails on anything else of interest
/// arriving first.
async fn first_message(device: &mut Device) -> anyhow::Result<(String, String)> {
    let event = device
        .next(|e| match e {
            Event::Message(_) | Event::Typing(_) => Some(e),
            _ => None,
        })
        .await?;
    match event {
        Event::Message(m) => Ok((m.sender.to_string(), support::text(&m))),
        other => anyhow::bail!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn forged_altered_stale_and_replayed_requests_are_refused_and_change_nothing() -> anyhow::Result<()> {
    let mut net =
        FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv), ("c.test", Discovery::Srv)], "").await?;
    let alice_session = support::register(&net.server("a.test").base_url, "alice").await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let alice = Device::connect(&alice_session).await?;
    let mut bob = raw_receiver(&bob_session).await?;
    let (alice_id, bob_id) = (alice_session.user_id.clone(), bob_session.user_id.clone());
    let a_key = key_of(net.server("a.test"))?;
    let a_id = a_key.key_id.clone();
    let c_id = key_of(net.server("c.test"))?.key_id;
    // a.test's key pair under c.test's key id.
    let a_key_as_c = ServerKey { key_id: c_id.clone(), ..key_of(net.server("a.test"))? };
    let stranger = ServerKey::generate();
    let peer = Peer::new(&net, "b.test", &net.servers[1].server)?;
    let mut findings = Findings::default();
    let put = "PUT";
    let empty = transaction("a.test", Vec::new())?;
    let now = Timestamp::now();

    // No signature, or not one that parses.
    let answer = peer.put_send("forged-1", None, &empty).await?;
    findings.expect("unsigned", &answer, 401, &["unsigned"]);
    let answer = peer.put_send("forged-2", Some("Bearer abc"), &empty).await?;
    findings.expect("another scheme", &answer, 401, &["unsigned"]);
    let answer = peer.put_send("forged-3", Some("Parley garbage"), &empty).await?;
    findings.expect("garbage", &answer, 401, &["bad_authorization"]);
    let header = format!(r#"Parley origin="a.test",destination="b.test",key="{a_id}",ts="{now}",sig="!!!""#);
    let answer = peer.put_send("forged-4", Some(&header), &empty).await?;
    findings.expect("signature not base64", &answer, 401, &["bad_authorization"]);

    // Signed by a key a.test does not have.
    let header = sign(&stranger, &stranger.key_id, "a.test", "b.test", put, &send_path("forged-5"), now, &empty)?;
    let answer = peer.put_send("forged-5", Some(&header), &empty).await?;
    findings.expect("random key, key id a.test does not publish", &answer, 401, &["unknown_server_key"]);
    let header = sign(&stranger, &a_id, "a.test", "b.test", put, &send_path("forged-6"), now, &empty)?;
    let answer = peer.put_send("forged-6", Some(&header), &empty).await?;
    findings.expect("random key under a.test's key id", &answer, 401, &["bad_signature"]);

    // a.test's real key, but the request changed after signing.
    let other = transaction("a.test", vec![Item::Typing(TypingItem::new(alice_id.clone(), bob_id.clone(), true))])?;
    let header = sign(&a_key, &a_id, "a.test", "b.test", put, &send_path("forged-7"), now, &empty)?;
    let answer = peer.put_send("forged-7", Some(&header), &other).await?;
    findings.expect("body changed after signing", &answer, 401, &["bad_signature"]);
    let header = sign(&a_key, &a_id, "a.test", "b.test", put, &send_path("forged-8"), now, &empty)?;
    let answer = peer.put_send("forged-8-other", Some(&header), &empty).await?;
    findings.expect("path changed after signing", &answer, 401, &["bad_signature"]);
    let header = sign(&a_key, &a_id, "a.test", "b.test", "POST", &send_path("forged-9"), now, &empty)?;
    let answer = peer.put_send("forged-9", Some(&header), &empty).await?;
    findings.expect("method changed after signing", &answer, 401, &["bad_signature"]);

    // Outside the clock skew window, or for another server.
    let header = sign(&a_key, &a_id, "a.test", "b.test", put, &send_path("forged-10"), now.saturating_sub(TEN_MINUTES), &empty)?;
    let answer = peer.put_send("forged-10", Some(&header), &empty).await?;
    findings.expect("signed 10 minutes ago", &answer, 401, &["stale_request"]);
    let header = sign(&a_key, &a_id, "a.test", "b.test", put, &send_path("forged-11"), now.saturating_add(TEN_MINUTES), &empty)?;
    let answer = peer.put_send("forged-11", Some(&header), &empty).await?;
    findings.expect("signed 10 minutes ahead", &answer, 401, &["stale_request"]);
    let header = sign(&a_key, &a_id, "a.test", "c.test", put, &send_path("forged-12"), now, &empty)?;
    let answer = peer.put_send("forged-12", Some(&header), &empty).await?;
    findings.expect("destination c.test", &answer, 401, &["wrong_destination"]);

    // a.test impersonating c.test.
    let c_empty = transaction("c.test", Vec::new())?;
    let header = sign(&a_key, &a_id, "a.test", "b.test", put, &send_path("forged-13"), now, &c_empty)?
        .replace(r#"origin="a.test""#, r#"origin="c.test""#);
    let answer = peer.put_send("forged-13", Some(&header), &c_empty).await?;
    findings.expect("a.test's signature, origin changed to c.test", &answer, 401, &["unknown_server_key", "bad_signature"]);
    let header = sign(&a_key, &a_id, "c.test", "b.test", put, &send_path("forged-14"), now, &c_empty)?;
    let answer = peer.put_send("forged-14", Some(&header), &c_empty).await?;
    findings.expect("signed as c.test with a.test's key and key id", &answer, 401, &["unknown_server_key"]);
    let header = sign(&a_key, &c_id, "c.test", "b.test", put, &send_path("forged-15"), now, &c_empty)?;
    let answer = peer.put_send("forged-15", Some(&header), &c_empty).await?;
    findings.expect("signed as c.test with a.test's key under c.test's key id", &answer, 401, &["bad_signature"]);
    let header = sign(&a_key, &a_id, "a.test", "b.test", put, &send_path("forged-16"), now, &c_empty)?;
    let answer = peer.put_send("forged-16", Some(&header), &c_empty).await?;
    findings.expect("signed by a.test, transaction origin c.test", &answer, 403, &["forbidden"]);

    // The other signed endpoints.
    let devices = format!("/_parley/federation/v1/users/{bob_id}/devices");
    let answer = peer.request(Method::GET, &devices, None, b"").await?;
    findings.expect("devices, unsigned", &answer, 401, &["unsigned"]);
    let header = sign(&stranger, &a_id, "a.test", "b.test", "GET", &devices, now, b"")?;
    let answer = peer.request(Method::GET, &devices, Some(&header), b"").await?;
    findings.expect("devices, random key under a.test's key id", &answer, 401, &["bad_signature"]);
    let claim_path = "/_parley/federation/v1/keys/claim";
    let claim = serde_json::to_vec(&serde_json::json!({"devices": [{"user": bob_id, "device": bob_session.device_id}]}))?;
    let header = sign(&a_key, &a_id, "a.test", "b.test", "POST", claim_path, now, b"{}")?;
    let answer = peer.request(Method::POST, claim_path, Some(&header), &claim).await?;
    findings.expect("key claim, body changed after signing", &answer, 401, &["bad_signature"]);

    // A valid request is accepted once; the identical request again is a replay.
    let header = sign(&a_key, &a_id, "a.test", "b.test", put, &send_path("valid-1"), Timestamp::now(), &empty)?;
    let answer = peer.put_send("valid-1", Some(&header), &empty).await?;
    if answer.0 != 200 {
        findings.0.push(format!("valid empty transaction: expected 200, got {} {}", answer.0, answer.1));
    }
    let answer = peer.put_send("valid-1", Some(&header), &empty).await?;
    findings.expect("the same signed request again", &answer, 401, &["replayed_request"]);

    // A valid transaction of a.test whose items speak for other servers' users, or carry bad
    // message signatures: accepted as a transaction, every item refused.
    // (A message of a.test's own user sent by a.test itself is proven by the request signature
    // over the whole body; its message signature is checked only when another server relays
    // it — items 1, 2 and 4.)
    let (alice_device, bob_device) = (&alice_session.device_id, &bob_session.device_id);
    let items = vec![
        // 0: a user of c.test in a message a.test signs as its own.
        Item::Message(message(
            (1 << 60) + 1,
            "@mallory:c.test",
            alice_device,
            &bob_id,
            bob_device,
            "mallory 0",
            "a.test",
            &a_key,
        )?),
        // 1: claims c.test signed it, with a key id c.test does not publish.
        Item::Message(message(
            (1 << 60) + 2,
            "@mallory:c.test",
            alice_device,
            &bob_id,
            bob_device,
            "mallory 1",
            "c.test",
            &a_key,
        )?),
        // 2: claims c.test signed it under c.test's key id, signed by a.test's key.
        Item::Message(message(
            (1 << 60) + 3,
            "@mallory:c.test",
            alice_device,
            &bob_id,
            bob_device,
            "mallory 2",
            "c.test",
            &a_key_as_c,
        )?),
        // 3: typing as a user of c.test.
        Item::Typing(TypingItem::new(UserId::parse("@mallory:c.test")?, bob_id.clone(), true)),
        // 4: claims c.test as its origin and carries no signature (only a message its origin
        // sends itself may leave it out).
        Item::Message({
            let mut unsigned =
                message((1 << 60) + 4, "@mallory:c.test", alice_device, &bob_id, bob_device, "mallory 4", "c.test", &a_key_as_c)?;
            unsigned.key_id.clear();
            unsigned.signature = Default::default();
            unsigned
        }),
    ];
    let body = transaction("a.test", items)?;
    let header = sign(&a_key, &a_id, "a.test", "b.test", put, &send_path("valid-2"), Timestamp::now(), &body)?;
    let (status, answer) = peer.put_send("valid-2", Some(&header), &body).await?;
    let rejected: Vec<(u64, String)> = answer["rejected"]
        .as_array()
        .map(|r| r.iter().map(|r| (r["index"].as_u64().unwrap_or(99), r["code"].as_str().unwrap_or("").to_owned())).collect())
        .unwrap_or_default();
    let expected: Vec<(u64, String)> =
        [(0, "forbidden"), (1, "unknown_server_key"), (2, "bad_signature"), (3, "forbidden"), (4, "bad_signature")]
            .into_iter()
            .map(|(i, c)| (i, c.to_owned()))
            .collect();
    if status != 200 || rejected != expected {
        findings.0.push(format!("impersonating items: expected 200 with {expected:?} rejected, got {status} {answer}"));
    }

    // Nothing reached bob: the first message (or typing notice) he gets is alice's, sent now.
    alice.send_text(&bob_id, "the only message").await?;
    let first = first_message(&mut bob).await?;
    if first != (alice_id.to_string(), "the only message".to_owned()) {
        findings.0.push(format!("bob's first message: {first:?}"));
    }
    // b.test recorded only the two valid transactions of a.test and alice's real one.
    let txns = net.server("b.test").inbound_txns().await?;
    let foreign: Vec<_> = txns.iter().filter(|(origin, id)| origin != "a.test" || id.starts_with("forged")).collect();
    if !foreign.is_empty() || !txns.iter().any(|t| t.1 == "valid-1") || !txns.iter().any(|t| t.1 == "valid-2") {
        findings.0.push(format!("fed_inbound_txns on b.test: {txns:?}"));
    }
    let rows = net.server("b.test").inbox_rows_from(alice_id.as_str()).await?;
    if rows != (1, 1) {
        findings.0.push(format!("bob's inbox rows from alice: {rows:?}"));
    }
    findings.check();
    Ok(())
}

#[tokio::test]
async fn a_transaction_resent_with_a_new_signature_is_applied_once() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let alice_session = support::register(&net.server("a.test").base_url, "alice").await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let alice = Device::connect(&alice_session).await?;
    let mut bob = raw_receiver(&bob_session).await?;
    let (alice_id, bob_id) = (alice_session.user_id.clone(), bob_session.user_id.clone());
    let a_key = key_of(net.server("a.test"))?;
    let peer = Peer::new(&net, "b.test", &net.servers[1].server)?;

    let item = message(
        1 << 60,
        alice_id.as_str(),
        &alice_session.device_id,
        &bob_id,
        &bob_session.device_id,
        "sent twice",
        "a.test",
        &a_key,
    )?;
    let body = transaction("a.test", vec![Item::Message(item)])?;
    let path = send_path("idem-1");
    let ts = Timestamp::now();
    let first = sign(&a_key, &a_key.key_id, "a.test", "b.test", "PUT", &path, ts, &body)?;
    let second =
        sign(&a_key, &a_key.key_id, "a.test", "b.test", "PUT", &path, ts.saturating_add(Duration::from_millis(1)), &body)?;
    ensure!(first != second);
    for header in [&first, &second] {
        let (status, answer) = peer.put_send("idem-1", Some(header), &body).await?;
        assert_eq!((status, answer["rejected"].as_array().map_or(0, |r| r.len())), (200, 0), "{answer}");
    }
    assert_eq!(receive_texts(&mut bob, 1).await?, ["sent twice"]);
    // Not twice: the next message is a fresh one sent the normal way.
    let template = support::envelopes(&alice_session, &bob_id, b"x").await?;
    send_texts(&alice, &bob_id, &template, &["marker".to_owned()]).await?;
    assert_eq!(receive_texts(&mut bob, 1).await?, ["marker"]);
    assert_eq!(net.server("b.test").inbox_rows_from(alice_id.as_str()).await?, (2, 2), "(inbox rows, distinct ids) on b.test");
    Ok(())
}

/// Rewrites `[federation] deny` in a stopped server's config file (which the harness keeps
/// next to its data directory), for its next start.
fn set_deny(server: &TestServer, deny: &[&str]) -> anyhow::Result<()> {
    let path = server.data_dir().parent().context("data dir parent")?.join("parleyd.toml");
    let mut config: toml::Table = std::fs::read_to_string(&path)?.parse()?;
    let federation = config.get_mut("federation").and_then(|f| f.as_table_mut()).context("no [federation] in the config")?;
    federation.insert("deny".into(), toml::Value::Array(deny.iter().map(|d| toml::Value::from(*d)).collect()));
    std::fs::write(&path, toml::to_string(&config)?)?;
    Ok(())
}

#[tokio::test]
async fn a_denied_server_is_refused_and_its_messages_wait_in_its_queue() -> anyhow::Result<()> {
    let net = FedNet::start(&[("a.test", Discovery::Srv)], "").await?;
    // b.test, started by hand to change its deny list between starts.
    let mut b = TestServer::start_with(&net.config_for("b.test", Discovery::Srv, "[federation]\ndeny = [\"a.test\"]")?).await?;
    let b_port = b.federation_addr.context("b.test federation address")?.port();
    net.dns.add_a("b.test", std::net::Ipv4Addr::LOCALHOST.into()).await?;
    net.dns.add_srv("_parley._tcp.b.test", 10, 10, b_port, "b.test").await?;
    let a = &net.servers[0].server;
    let alice_session = support::register(&a.base_url, "alice").await?;
    let bob_session = support::register(&b.base_url, "bob").await?;
    let (alice_id, bob_id) = (alice_session.user_id.clone(), bob_session.user_id.clone());
    let alice = Device::connect(&alice_session).await?;
    let a_key = key_of(a)?;
    let peer = Peer::new(&net, "b.test", &b)?;

    // A request correctly signed by a.test is refused.
    let empty = transaction("a.test", Vec::new())?;
    let header = sign(&a_key, &a_key.key_id, "a.test", "b.test", "PUT", &send_path("denied-1"), Timestamp::now(), &empty)?;
    let answer = peer.put_send("denied-1", Some(&header), &empty).await?;
    assert_eq!((answer.0, answer.1["code"].as_str()), (403, Some("server_denied")), "{}", answer.1);
    // alice cannot even start: a.test cannot learn bob's devices, so the send is refused.
    match alice.send_text(&bob_id, "refused").await {
        Err(error) => {
            let text = format!("{error:#}");
            assert!(text.contains("server_denied"), "{text}");
        }
        Ok(sent) => panic!("a send to a server that denies a.test was accepted: {sent:?}"),
    }

    // a.test learns bob's devices while b.test allows it ...
    b.stop().await?;
    set_deny(&b, &[])?;
    b.restart().await?;
    let template = support::envelopes(&alice_session, &bob_id, b"x").await?;
    ensure!(template.len() == 1, "expected bob's one device, got {template:?}");
    // ... then b.test denies a.test again: alice's message is accepted and queued at a.test,
    // and b.test refuses the transaction.
    b.stop().await?;
    set_deny(&b, &["a.test"])?;
    b.restart().await?;
    let mut bob = raw_receiver(&bob_session).await?;
    send_texts(&alice, &bob_id, &template, &["queued while denied".to_owned()]).await?;
    let line = a.wait_for_log(&["transaction failed", "403"], Duration::from_secs(30)).await?;
    assert!(line.contains("b.test"), "{line}");
    while let Some(event) = bob.try_next() {
        assert!(!matches!(event, Event::Message(_)), "bob received a message while a.test is denied: {event:?}");
    }
    assert_eq!(b.inbound_txns().await?, Vec::<(String, String)>::new(), "b.test recorded a transaction of a denied server");

    // Once b.test allows a.test again, the queued message arrives, once.
    drop(bob);
    b.stop().await?;
    set_deny(&b, &[])?;
    b.restart().await?;
    let mut bob = raw_receiver(&bob_session).await?;
    assert_eq!(receive_texts(&mut bob, 1).await?, ["queued while denied"]);
    send_texts(&alice, &bob_id, &template, &["marker".to_owned()]).await?;
    assert_eq!(receive_texts(&mut bob, 1).await?, ["marker"]);
    assert_eq!(b.inbox_rows_from(alice_id.as_str()).await?, (2, 2), "(inbox rows, distinct ids) on b.test");
    Ok(())
}

#[tokio::test]
async fn forged_requests_do_not_use_up_the_rate_limit_of_the_server_they_claim_to_be() -> anyhow::Result<()> {
    let extra = "[federation]\norigin_per_second = 1\norigin_burst = 5\n";
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], extra).await?;
    let a_key = key_of(net.server("a.test"))?;
    let stranger = ServerKey::generate();
    let peer = Peer::new(&net, "b.test", &net.servers[1].server)?;
    let empty = transaction("a.test", Vec::new())?;
    // Anyone can send requests claiming to be a.test; they fail the signature check ...
    let mut forged = Vec::new();
    for n in 0..20 {
        let txn = format!("forged-{n}");
        let header = sign(&stranger, &a_key.key_id, "a.test", "b.test", "PUT", &send_path(&txn), Timestamp::now(), &empty)?;
        let (status, answer) = peer.put_send(&txn, Some(&header), &empty).await?;
        forged.push(format!("{status} {}", answer["code"].as_str().unwrap_or("")));
    }
    // ... and must not lock the real a.test out.
    let header = sign(&a_key, &a_key.key_id, "a.test", "b.test", "PUT", &send_path("real-1"), Timestamp::now(), &empty)?;
    let (status, answer) = peer.put_send("real-1", Some(&header), &empty).await?;
    assert_eq!(status, 200, "the real a.test after 20 forged requests in its name: {answer}; the forged ones got {forged:?}");
    Ok(())
}

/// Serves `GET /_parley/key/v1` over HTTPS with `document` (whatever the request), as the
/// operator of a domain can on any port of it.
#[tokio::test]
async fn a_denied_server_is_still_denied_when_its_name_carries_a_port() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("b.test", Discovery::Srv)], "[federation]\ndeny = [\"a.test\"]\n").await?;
    net.dns.add_a("a.test", std::net::Ipv4Addr::LOCALHOST.into()).await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let bob_id = bob_session.user_id.clone();
    let mut bob = raw_receiver(&bob_session).await?;
    let peer = Peer::new(&net, "b.test", &net.servers[0].server)?;

    // The operator of the denied a.test publishes keys for "a.test:<port>", on that port of
    // a.test, with a certificate for a.test (which they have).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let name = format!("a.test:{}", listener.local_addr()?.port());
    let key = ServerKey::generate();
    let document = parley_federation::sign_server_keys(&server_name(&name)?, &key, Timestamp::now(), 24 * 3600 * 1000);
    let issued = net.ca.issue(&["a.test"])?;
    let tls = parley_tests::fednet::tls_config(&issued.cert_pem, &issued.key_pem)?;
    let document = serde_json::to_vec(&document)?;
    let key_server = tokio::spawn(parley_tests::fednet::serve_https(listener, tls, move |_, _| Some(document.clone())));

    // As plain a.test it is refused ...
    let empty = transaction("a.test", Vec::new())?;
    let header = sign(&key, &key.key_id, "a.test", "b.test", "PUT", &send_path("plain-1"), Timestamp::now(), &empty)?;
    let answer = peer.put_send("plain-1", Some(&header), &empty).await?;
    assert_eq!((answer.0, answer.1["code"].as_str()), (403, Some("server_denied")), "{}", answer.1);

    // ... and must be as a.test:<port> too.
    let mallory = format!("@mallory:{name}");
    let device = DeviceId::parse("MALLORY")?;
    let item = message(1, &mallory, &device, &bob_id, &bob_session.device_id, "hello from a denied server", &name, &key)?;
    let body = transaction(&name, vec![Item::Message(item)])?;
    let header = sign(&key, &key.key_id, &name, "b.test", "PUT", &send_path("port-1"), Timestamp::now(), &body)?;
    let answer = peer.put_send("port-1", Some(&header), &body).await?;
    key_server.abort();
    let delivered = match answer.0 {
        200 => Some(first_message(&mut bob).await?),
        _ => None,
    };
    assert_eq!(
        (answer.0, answer.1["code"].as_str()),
        (403, Some("server_denied")),
        "{name} (deny list: a.test) got {} {}; bob received {delivered:?}",
        answer.0,
        answer.1
    );
    Ok(())
}

#[tokio::test]
async fn bad_input_from_a_signed_peer_gets_typed_errors_and_the_server_keeps_serving() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let alice_session = support::register(&net.server("a.test").base_url, "alice").await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let mut bob = raw_receiver(&bob_session).await?;
    let a_key = key_of(net.server("a.test"))?;
    let peer = Peer::new(&net, "b.test", &net.servers[1].server)?;
    let signed =
        |txn: &str, body: &[u8]| sign(&a_key, &a_key.key_id, "a.test", "b.test", "PUT", &send_path(txn), Timestamp::now(), body);

    // Not JSON, or JSON of the wrong shape, correctly signed: 400 bad_json.
    for (txn, body) in [("junk-1", &b"{not json"[..]), ("junk-2", &br#"{"origin":"a.test","items":7}"#[..])] {
        let answer = peer.put_send(txn, Some(&signed(txn, body)?), body).await?;
        assert_eq!((answer.0, answer.1["code"].as_str()), (400, Some("bad_json")), "{answer:?}");
    }
    // A txn_id with a control character (NUL, percent-encoded in the path): 400 bad_request.
    let nul = "nul%00id";
    let empty = transaction("a.test", vec![])?;
    let answer = peer.put_send(nul, Some(&signed(nul, &empty)?), &empty).await?;
    assert_eq!((answer.0, answer.1["code"].as_str()), (400, Some("bad_request")), "{answer:?}");
    // Larger than twice max_txn_bytes (default 4 MiB): 413 too_large.
    let huge = vec![b' '; 9 * 1024 * 1024];
    let answer = peer.put_send("huge", Some(&signed("huge", &huge)?), &huge).await?;
    assert_eq!((answer.0, answer.1["code"].as_str()), (413, Some("too_large")), "{answer:?}");
    // (The server answered before reading that body and closed the connection: a new client.)
    let peer = Peer::new(&net, "b.test", &net.servers[1].server)?;
    // An envelope over the destination's limit, and a receipt for 1,001 messages: refused items.
    let mut big = message(
        1 << 61,
        alice_session.user_id.as_str(),
        &alice_session.device_id,
        &bob_session.user_id,
        &bob_session.device_id,
        "x",
        "a.test",
        &a_key,
    )?;
    big.envelopes = vec![FedEnvelope::new(bob_session.device_id.clone(), vec![0; 256 * 1024 + 1])];
    sign_message(&mut big, &a_key);
    let receipt = parley_spec::v1::events::ReceiptEvent::new(
        parley_spec::v1::events::ReceiptKind::Read,
        alice_session.user_id.clone(),
        alice_session.device_id.clone(),
        bob_session.user_id.clone(),
        (0..1001).map(ServerMsgId::new).collect(),
        Timestamp::now(),
    );
    let body = transaction("a.test", vec![Item::Message(big), Item::Receipt(receipt)])?;
    let (status, answer) = peer.put_send("limits", Some(&signed("limits", &body)?), &body).await?;
    let codes: Vec<&str> = answer["rejected"].as_array().into_iter().flatten().filter_map(|r| r["code"].as_str()).collect();
    assert_eq!((status, codes), (200, vec!["too_large", "bad_request"]), "{answer}");
    // A key claim must name the user of a.test it is for: missing, 400 bad_json; a user of
    // another server, 403 forbidden.
    let claim_path = "/_parley/federation/v1/keys/claim";
    let device = serde_json::json!({"user": bob_session.user_id, "device": bob_session.device_id});
    for (body, status, code) in [
        (serde_json::json!({"devices": [device]}), 400, "bad_json"),
        (serde_json::json!({"requester": "@mallory:c.test", "devices": [device]}), 403, "forbidden"),
    ] {
        let body = serde_json::to_vec(&body)?;
        let header = sign(&a_key, &a_key.key_id, "a.test", "b.test", "POST", claim_path, Timestamp::now(), &body)?;
        let answer = peer.request(Method::POST, claim_path, Some(&header), &body).await?;
        assert_eq!((answer.0, answer.1["code"].as_str()), (status, Some(code)), "{answer:?}");
    }
    // An unknown endpoint: 404 not_found with the error body.
    let answer = peer.request(Method::GET, "/_parley/federation/v1/nothing", None, b"").await?;
    assert_eq!((answer.0, answer.1["code"].as_str()), (404, Some("not_found")), "{answer:?}");

    // Still serving, and nothing of the above arrived: the next message is a normal one.
    let alice = Device::connect(&alice_session).await?;
    alice.send_text(&bob_session.user_id, "after the garbage").await?;
    assert_eq!(receive_texts(&mut bob, 1).await?, ["after the garbage"]);
    Ok(())
}

#[tokio::test]
async fn an_address_that_keeps_failing_authentication_is_refused_for_a_while() -> anyhow::Result<()> {
    let extra = "[federation]\nfailed_auth_per_minute = 1\nfailed_auth_burst = 3\n";
    let net = FedNet::start(&[("b.test", Discovery::Srv)], extra).await?;
    let peer = Peer::new(&net, "b.test", &net.servers[0].server)?;
    let forger = ServerKey::generate();
    let body = transaction("a.test", Vec::new())?;
    let mut codes = Vec::new();
    for i in 0..5 {
        let txn = format!("forged-{i}");
        let header = sign(&forger, &forger.key_id, "a.test", "b.test", "PUT", &send_path(&txn), Timestamp::now(), &body)?;
        let (status, answer) = peer.put_send(&txn, Some(&header), &body).await?;
        codes.push((status, answer["code"].as_str().unwrap_or("").to_owned()));
    }
    // Three failures are allowed (a.test is not even up: its key cannot be fetched); the fourth
    // fails too and blocks the address, so the fifth is refused before any work.
    let expected: Vec<(u16, String)> =
        [(401, "unknown_server_key"); 4].into_iter().chain([(429, "rate_limited")]).map(|(s, c)| (s, c.to_owned())).collect();
    assert_eq!(codes, expected);
    Ok(())
}

/// Sends `items` from `origin` (signed with its `key`) to b.test as transaction `txn`; every
/// item must be accepted.
async fn put_txn(peer: &Peer, key: &ServerKey, origin: &str, txn: &str, items: Vec<Item>) -> anyhow::Result<()> {
    let body = transaction(origin, items)?;
    let header = sign(key, &key.key_id, origin, "b.test", "PUT", &send_path(txn), Timestamp::now(), &body)?;
    let (status, answer) = peer.put_send(txn, Some(&header), &body).await?;
    ensure!(status == 200 && answer["rejected"].is_null(), "{txn}: {status} {answer}");
    Ok(())
}

#[tokio::test]
async fn a_message_id_seen_from_its_origin_is_delivered_once_across_transactions_and_restarts() -> anyhow::Result<()> {
    // Processes: b.test is SIGKILLed.
    let mut net = FedNet::start_as(
        Mode::Process,
        &[("a.test", Discovery::Srv), ("b.test", Discovery::Srv), ("c.test", Discovery::Srv)],
        "",
    )
    .await?;
    let alice_session = support::register(&net.server("a.test").base_url, "alice").await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let alice = Device::connect(&alice_session).await?;
    let mut bob = raw_receiver(&bob_session).await?;
    let (alice_id, bob_id) = (alice_session.user_id.clone(), bob_session.user_id.clone());
    let (a_key, c_key) = (key_of(net.server("a.test"))?, key_of(net.server("c.test"))?);
    let peer = Peer::new(&net, "b.test", &net.servers[1].server)?;
    let id = 1 << 60;
    let first =
        message(id, alice_id.as_str(), &alice_session.device_id, &bob_id, &bob_session.device_id, "once", "a.test", &a_key)?;
    put_txn(&peer, &a_key, "a.test", "dedupe-1", vec![Item::Message(first.clone())]).await?;
    // The same message again in new transactions (as after the origin lost its in-flight
    // record), once alone and twice in one transaction.
    put_txn(&peer, &a_key, "a.test", "dedupe-2", vec![Item::Message(first.clone())]).await?;
    put_txn(&peer, &a_key, "a.test", "dedupe-3", vec![Item::Message(first.clone()), Item::Message(first.clone())]).await?;
    // The same id from another origin is another message.
    let carol = "@carol:c.test";
    let other = message(
        id,
        carol,
        &DeviceId::parse("CAROL")?,
        &bob_id,
        &bob_session.device_id,
        "same id, other origin",
        "c.test",
        &c_key,
    )?;
    put_txn(&peer, &c_key, "c.test", "dedupe-4", vec![Item::Message(other)]).await?;
    alice.send_text(&bob_id, "marker 1").await?;
    assert_eq!(receive_texts(&mut bob, 3).await?, ["once", "same id, other origin", "marker 1"]);

    // Durable: after b.test is killed and restarted the id is still known.
    drop(bob);
    net.server("b.test").kill().await?;
    net.server("b.test").restart().await?;
    let mut bob = raw_receiver(&bob_session).await?;
    let peer = Peer::new(&net, "b.test", &net.servers[1].server)?;
    put_txn(&peer, &a_key, "a.test", "dedupe-5", vec![Item::Message(first)]).await?;
    alice.send_text(&bob_id, "marker 2").await?;
    // bob never acknowledged: the backlog comes again, then the second marker only.
    assert_eq!(receive_texts(&mut bob, 4).await?, ["once", "same id, other origin", "marker 1", "marker 2"]);
    assert_eq!(net.server("b.test").inbox_rows_from(alice_id.as_str()).await?, (3, 3), "(inbox rows, distinct ids) on b.test");
    Ok(())
}

#[tokio::test]
async fn a_message_id_beyond_stored_integers_is_refused_and_the_rest_of_its_transaction_applies() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let alice_session = support::register(&net.server("a.test").base_url, "alice").await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let mut bob = raw_receiver(&bob_session).await?;
    let a_key = key_of(net.server("a.test"))?;
    let peer = Peer::new(&net, "b.test", &net.servers[1].server)?;
    let (alice_id, bob_id) = (alice_session.user_id.as_str(), &bob_session.user_id);
    let item = |id: u64, text: &str| {
        let message = message(id, alice_id, &alice_session.device_id, bob_id, &bob_session.device_id, text, "a.test", &a_key);
        message.map(Item::Message)
    };
    // Servers keep message ids as SQLite integers: an id from 2^63 on is bad input from the
    // peer (not a failed commit for the whole transaction), and the largest valid id works.
    let body = transaction("a.test", vec![item(1 << 63, "too large")?, item((1 << 63) - 1, "largest")?])?;
    let header = sign(&a_key, &a_key.key_id, "a.test", "b.test", "PUT", &send_path("ids-1"), Timestamp::now(), &body)?;
    let (status, answer) = peer.put_send("ids-1", Some(&header), &body).await?;
    let rejected: Vec<(u64, &str)> = answer["rejected"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| Some((r["index"].as_u64()?, r["code"].as_str()?)))
        .collect();
    assert_eq!((status, rejected), (200, vec![(0, "bad_request")]), "{answer}");
    assert_eq!(receive_texts(&mut bob, 1).await?, ["largest"]);
    Ok(())
}

#[tokio::test]
async fn presence_of_a_remote_user_reaches_only_local_users_who_subscribed_to_it() -> anyhow::Result<()> {
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let alice_session = support::register(&net.server("a.test").base_url, "alice").await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let carol_session = support::register(&net.server("b.test").base_url, "carol").await?;
    let alice_id = alice_session.user_id.clone();
    // carol follows alice; bob never did.
    parley_sdk::Api::new(&carol_session)?.subscribe_presence(vec![alice_id.clone()]).await?;
    let alice = Device::connect(&alice_session).await?;
    let mut bob = raw_receiver(&bob_session).await?;
    let mut carol = raw_receiver(&carol_session).await?;
    let a_key = key_of(net.server("a.test"))?;
    let peer = Peer::new(&net, "b.test", &net.servers[1].server)?;

    // a.test (signed correctly) names both as viewers of alice's presence.
    let online =
        parley_spec::v1::presence::PresenceInfo::new(alice_id.clone(), parley_spec::v1::presence::PresenceStatus::Online, None);
    let viewers = vec![bob_session.user_id.clone(), carol_session.user_id.clone()];
    let item = Item::Presence(parley_spec::federation::v1::transaction::PresenceItem::new(online, viewers));
    let body = transaction("a.test", vec![item])?;
    let header = sign(&a_key, &a_key.key_id, "a.test", "b.test", "PUT", &send_path("presence-1"), Timestamp::now(), &body)?;
    let (status, answer) = peer.put_send("presence-1", Some(&header), &body).await?;
    assert_eq!(status, 200, "{answer}");

    // carol, who subscribed, sees it.
    let seen = carol
        .next(|e| match e {
            Event::Presence(p) if p.user == alice_id && p.status == parley_sdk::PresenceStatus::Online => Some(p),
            _ => None,
        })
        .await?;
    assert_eq!(seen.user, alice_id);
    // bob gets nothing of alice's presence before a message alice sends afterwards.
    alice.send_text(&bob_session.user_id, "marker").await?;
    let mut before_marker = Vec::new();
    loop {
        match bob.next(Some).await? {
            Event::Message(m) if support::text(&m) == "marker" => break,
            Event::Presence(p) => before_marker.push(p),
            _ => {}
        }
    }
    assert!(before_marker.is_empty(), "bob never subscribed to alice but got {before_marker:?}");
    Ok(())
}

#[tokio::test]
async fn receipts_from_a_server_name_only_messages_its_users_were_sent() -> anyhow::Result<()> {
    use parley_spec::v1::events::{ReceiptEvent, ReceiptKind};
    let mut net = FedNet::start(&[("a.test", Discovery::Srv), ("b.test", Discovery::Srv)], "").await?;
    let alice_session = support::register(&net.server("a.test").base_url, "alice").await?;
    let dave_session = support::register(&net.server("a.test").base_url, "dave").await?;
    let bob_session = support::register(&net.server("b.test").base_url, "bob").await?;
    let (alice_id, bob_id) = (alice_session.user_id.clone(), bob_session.user_id.clone());
    let mallory_id = UserId::parse("@mallory:b.test")?;
    let mut alice = Device::connect(&alice_session).await?;
    let mut bob = Device::connect(&bob_session).await?;
    let to_bob = alice.send_text(&bob_id, "for bob").await?;
    assert_eq!(bob.next_message().await?.id, to_bob.server_msg_id);
    let to_dave = alice.send_text(&dave_session.user_id, "for dave").await?;

    // b.test (its real key) claims receipts for alice's messages: by a user alice never wrote
    // to, and by bob for a message alice sent to dave. Refused items, delivered to no one.
    let b_key = key_of(net.server("b.test"))?;
    let receipt = |kind, by: &UserId, id: ServerMsgId| {
        Item::Receipt(ReceiptEvent::new(
            kind,
            by.clone(),
            DeviceId::parse("EVIL").unwrap(),
            alice_id.clone(),
            vec![id],
            Timestamp::now(),
        ))
    };
    let items = vec![
        receipt(ReceiptKind::Read, &mallory_id, to_bob.server_msg_id),
        receipt(ReceiptKind::Delivered, &mallory_id, to_bob.server_msg_id),
        receipt(ReceiptKind::Read, &bob_id, to_dave.server_msg_id),
        receipt(ReceiptKind::Delivered, &bob_id, to_dave.server_msg_id),
    ];
    let body = transaction("b.test", items)?;
    let peer = Peer::new(&net, "a.test", &net.servers[0].server)?;
    let header = sign(&b_key, &b_key.key_id, "b.test", "a.test", "PUT", &send_path("receipts-1"), Timestamp::now(), &body)?;
    let (status, answer) = peer.put_send("receipts-1", Some(&header), &body).await?;

    // bob reads alice's message to him (through b.test): every receipt alice gets up to his read
    // receipt is bob's, for that message.
    bob.conn.read(alice_id.clone(), vec![to_bob.server_msg_id]).await?;
    let mut receipts = Vec::new();
    alice
        .next(|e| match e {
            Event::Receipt(r) => {
                let done = r.kind == ReceiptKind::Read && r.by == bob_id;
                receipts.push((r.kind, r.by.to_string(), r.message_ids));
                done.then_some(())
            }
            _ => None,
        })
        .await?;
    let forged: Vec<_> =
        receipts.iter().filter(|(_, by, ids)| *by != bob_id.as_str() || *ids != [to_bob.server_msg_id]).collect();
    assert!(forged.is_empty(), "alice got receipts she should not have: {forged:?}");
    let codes: Vec<&str> = answer["rejected"].as_array().into_iter().flatten().filter_map(|r| r["code"].as_str()).collect();
    assert_eq!((status, codes), (200, vec!["bad_request"; 4]), "{answer}");

    // b.test's own users cannot make it send such receipts either: bob marking alice's message
    // to dave read is refused at b.test.
    let refused = parley_sdk::Api::new(&bob_session)?
        .read(parley_sdk::ReadRequest::new(alice_id.clone(), vec![to_dave.server_msg_id]))
        .await
        .err()
        .and_then(|e| e.server_code());
    assert_eq!(refused, Some(parley_spec::ErrorCode::BadRequest));
    Ok(())
}
