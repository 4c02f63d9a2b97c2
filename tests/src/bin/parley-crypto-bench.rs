//! `parley-crypto-bench`: the cost of 1:1 end-to-end encryption on one core.
//!
//! ```sh
//! cargo run --release -p parley-tests --bin parley-crypto-bench
//! ```
//!
//! Measures, single-threaded: one-way encrypt+decrypt of a 100-byte message (no ratchet step),
//! alternating conversation (a DH ratchet step every message), the same with the session
//! serialized and reloaded around every operation (what the SDK does to persist state), and
//! fanning one message out to 10 devices with existing sessions and with new sessions (X3DH).

use parley_crypto::identity::DeviceIdentity;
use parley_crypto::ratchet::{PrekeyStore, Session};
use parley_crypto::x3dh::{self, PrekeyPolicy, StaticSecret, X25519PublicKey};
use parley_spec::v1::keys::{OneTimePrekey, PrekeyBundle};
use parley_spec::{DeviceId, UserId};
use rand::rngs::OsRng;
use std::hint::black_box;
use std::time::{Duration, Instant};

struct Device {
    identity: DeviceIdentity,
    signed: StaticSecret,
    one_time: StaticSecret,
    bundle: PrekeyBundle,
}

impl Device {
    fn new(n: usize) -> Self {
        let identity = DeviceIdentity::generate(&mut OsRng);
        let signed = StaticSecret::random_from_rng(OsRng);
        let one_time = StaticSecret::random_from_rng(OsRng);
        let user: UserId = "@bob:example.org".parse().expect("valid user id");
        let device: DeviceId = format!("DEVICE{n}").parse().expect("valid device id");
        let bundle = PrekeyBundle::new(
            identity.device_keys(&user, &device),
            identity.sign_prekey(1, &X25519PublicKey::from(&signed)),
            Some(OneTimePrekey::new(7, X25519PublicKey::from(&one_time).as_bytes().to_vec())),
            None,
        );
        Self { identity, signed, one_time, bundle }
    }
}

impl PrekeyStore for Device {
    fn identity_key(&self) -> StaticSecret {
        self.identity.identity_secret().clone()
    }
    fn signed_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        (key_id == 1).then(|| self.signed.clone())
    }
    fn one_time_prekey(&self, key_id: u32) -> Option<StaticSecret> {
        (key_id == 7).then(|| self.one_time.clone())
    }
    fn last_resort_prekey(&self, _: u32) -> Option<StaticSecret> {
        None
    }
}

/// Alice's session with `bob`, and bob's, after one message each way.
fn pair(alice: &DeviceIdentity, bob: &Device) -> (Session, Session) {
    let initiated = x3dh::initiate(&mut OsRng, alice.identity_secret(), &bob.bundle, PrekeyPolicy::AllowThreeDh).expect("x3dh");
    let mut a = Session::initiate(&mut OsRng, initiated).expect("initiate");
    let first = a.encrypt(&mut OsRng, b"hello").expect("encrypt");
    let mut b = Session::accept_initial(bob, &first).expect("accept").session;
    let reply = b.encrypt(&mut OsRng, b"hi").expect("encrypt");
    a.decrypt(&reply).expect("decrypt");
    (a, b)
}

fn rate(iterations: u32, elapsed: Duration) -> f64 {
    iterations as f64 / elapsed.as_secs_f64()
}

fn main() {
    let message = [0x42u8; 100];
    let alice = DeviceIdentity::generate(&mut OsRng);
    let bob = Device::new(0);
    println!("| measure (one core, 100-byte messages) | result |");
    println!("|---|---|");

    let (mut a, mut b) = pair(&alice, &bob);
    let n = 100_000;
    let started = Instant::now();
    for _ in 0..n {
        let ciphertext = a.encrypt(&mut OsRng, &message).expect("encrypt");
        black_box(b.decrypt(&ciphertext).expect("decrypt"));
    }
    println!("| one-way encrypt+decrypt (chain step only) | {:.0} msgs/s |", rate(n, started.elapsed()));

    let n = 10_000;
    let started = Instant::now();
    for i in 0..n {
        let (from, to) = if i % 2 == 0 { (&mut a, &mut b) } else { (&mut b, &mut a) };
        let ciphertext = from.encrypt(&mut OsRng, &message).expect("encrypt");
        black_box(to.decrypt(&ciphertext).expect("decrypt"));
    }
    println!("| alternating encrypt+decrypt (DH ratchet step each message) | {:.0} msgs/s |", rate(n, started.elapsed()));

    let (a, b) = pair(&alice, &bob);
    let (mut a_state, mut b_state) = (a.to_bytes(), b.to_bytes());
    let n = 20_000;
    let started = Instant::now();
    for _ in 0..n {
        let mut a = Session::from_bytes(&a_state).expect("load");
        let ciphertext = a.encrypt(&mut OsRng, &message).expect("encrypt");
        a_state = a.to_bytes();
        let mut b = Session::from_bytes(&b_state).expect("load");
        black_box(b.decrypt(&ciphertext).expect("decrypt"));
        b_state = b.to_bytes();
    }
    println!("| one-way, session loaded and saved around each operation | {:.0} msgs/s |", rate(n, started.elapsed()));

    let devices: Vec<Device> = (0..10).map(Device::new).collect();
    let mut sessions: Vec<Session> = devices.iter().map(|d| pair(&alice, d).0).collect();
    let n = 5_000;
    let started = Instant::now();
    for _ in 0..n {
        for session in &mut sessions {
            black_box(session.encrypt(&mut OsRng, &message).expect("encrypt"));
        }
    }
    let per = started.elapsed() / n;
    println!("| fan-out of one message to 10 devices, existing sessions | {:.1} µs per message |", per.as_secs_f64() * 1e6);

    let n = 500;
    let started = Instant::now();
    for _ in 0..n {
        for device in &devices {
            let initiated =
                x3dh::initiate(&mut OsRng, alice.identity_secret(), &device.bundle, PrekeyPolicy::AllowThreeDh).expect("x3dh");
            let mut session = Session::initiate(&mut OsRng, initiated).expect("initiate");
            black_box(session.encrypt(&mut OsRng, &message).expect("encrypt"));
        }
    }
    let per = started.elapsed() / n;
    println!(
        "| fan-out to 10 devices with new sessions (X3DH, no signature checks) | {:.0} µs per message |",
        per.as_secs_f64() * 1e6
    );
}
