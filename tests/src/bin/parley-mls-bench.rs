//! `parley-mls-bench`: what one member's device spends on a commit in a large MLS group, on one
//! core, through `parley_crypto::mls` (openmls 0.9.2, our ciphersuite, in-memory storage).
//!
//! ```sh
//! cargo run --release -p parley-tests --bin parley-mls-bench -- --members 1000 --rounds 20
//! ```
//!
//! A creator adds `members - 1` devices in one commit; one of them (the receiver) joins from
//! the Welcome. Then, `rounds` times, the creator commits alternately the removal of one member
//! and an update of its own leaf; the receiver processes and merges each commit, and takes the
//! state changes the SDK would write to its store. Prints, per commit kind: the creator's build
//! time, the commit's size, the receiver's process + merge time and its state write (bytes and
//! time). This is the per-member floor behind "every member processed the commit" in
//! `parley-group-bench`, where 1,000 members share two cores.

use clap::Parser;
use parley_crypto::identity::DeviceIdentity;
use parley_crypto::mls::{Group, Incoming, KeyPackage, Lifetime, MemoryStorage, MlsClient};
use parley_spec::{DeviceId, UserId};
use rand::rngs::OsRng;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Group size (devices), the creator included.
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Commits measured (removals and updates alternately).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
}

struct Device {
    identity: DeviceIdentity,
    client: MlsClient<MemoryStorage>,
}

impl Device {
    fn new(i: usize) -> anyhow::Result<Self> {
        let identity = DeviceIdentity::generate(&mut OsRng);
        let user = UserId::parse(&format!("@m{i}:a.test"))?;
        let device = DeviceId::parse(&format!("DEV{i}"))?;
        let client = MlsClient::new(MemoryStorage::default(), user, device, &identity);
        Ok(Self { identity, client })
    }

    fn key_package(&self, now: u64) -> anyhow::Result<KeyPackage> {
        let kp = self.client.create_key_package(&self.identity, Lifetime::starting_at(now, 86_400), false)?;
        Ok(KeyPackage::from_bytes(kp.to_bytes())?)
    }
}

/// Per commit kind: build, size, process + merge, state bytes, state take.
#[derive(Default)]
struct Samples {
    build: Vec<f64>,
    size: Vec<f64>,
    process: Vec<f64>,
    state_bytes: Vec<f64>,
    state_take: Vec<f64>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let n = args.members.max(3);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let creator = Device::new(0)?;
    let receiver = Device::new(1)?;
    let mut packages = vec![receiver.key_package(now)?];
    for i in 2..n {
        packages.push(Device::new(i)?.key_package(now)?);
    }
    let mut group: Group = creator.client.create_group(&creator.identity, b"!bench:a.test")?;
    let started = Instant::now();
    let add = group.add_members(&creator.client, &creator.identity, &packages)?;
    let add_build = started.elapsed();
    group.merge_pending_commit(&creator.client)?;
    let tree = group.ratchet_tree()?;
    let started = Instant::now();
    let welcome = add.welcome.as_deref().ok_or_else(|| anyhow::anyhow!("no Welcome"))?;
    let mut joined = receiver.client.join(welcome, &tree)?.accept(&receiver.client)?;
    let join = started.elapsed();
    let _ = receiver.client.take_state_changes();
    println!("parley-mls-bench: {n} members, {} commits, one core", args.rounds);
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| add {} in one commit: build / commit / Welcome / tree | {:.0} ms / {:.0} KB / {:.0} KB / {:.0} KB |",
        n - 1,
        ms(add_build),
        add.commit.len() as f64 / 1000.0,
        welcome.len() as f64 / 1000.0,
        tree.len() as f64 / 1000.0
    );
    println!("| join from Welcome + tree | {:.0} ms |", ms(join));

    let (mut removes, mut updates) = (Samples::default(), Samples::default());
    for round in 0..args.rounds {
        let samples = if round % 2 == 0 { &mut removes } else { &mut updates };
        let started = Instant::now();
        let bundle = if round % 2 == 0 {
            // The last member that is neither the creator nor the receiver.
            let victim = group
                .members()?
                .into_iter()
                .rev()
                .find(|m| m.index != group.own_index() && m.index != joined.own_index())
                .ok_or_else(|| anyhow::anyhow!("no one left to remove"))?;
            group.remove_members(&creator.client, &creator.identity, &[victim.index])?
        } else {
            group.self_update(&creator.client, &creator.identity)?
        };
        samples.build.push(ms(started.elapsed()));
        samples.size.push(bundle.commit.len() as f64 / 1000.0);
        group.merge_pending_commit(&creator.client)?;
        let _ = creator.client.take_state_changes();

        let started = Instant::now();
        let Incoming::Commit(commit) = joined.process(&receiver.client, &bundle.commit)? else {
            anyhow::bail!("expected a commit")
        };
        joined.merge_commit(&receiver.client, commit)?;
        samples.process.push(ms(started.elapsed()));
        let started = Instant::now();
        let changes = receiver.client.take_state_changes();
        samples.state_take.push(ms(started.elapsed()));
        let bytes: usize = changes.iter().map(|c| c.key.len() + c.value.as_ref().map_or(0, Vec::len)).sum();
        samples.state_bytes.push(bytes as f64 / 1000.0);
    }
    for (kind, samples) in [("remove 1", &removes), ("update own leaf", &updates)] {
        if samples.process.is_empty() {
            continue;
        }
        let (lo, hi) = spread(&samples.process);
        println!("| {kind}: build / commit | {:.1} ms / {:.1} KB (medians) |", median(&samples.build), median(&samples.size));
        println!(
            "| {kind}: a member's process + merge, median (min–max of {}) | {:.2} ms ({lo:.2}–{hi:.2}) |",
            samples.process.len(),
            median(&samples.process)
        );
        println!(
            "| {kind}: state changes the SDK writes, size / time to take them | {:.0} KB / {:.2} ms |",
            median(&samples.state_bytes),
            median(&samples.state_take)
        );
    }
    let per_member = median(&removes.process) + median(&removes.state_take);
    println!("| {n} members × a remove's process + merge + state take, on 2 cores | {:.2} s |", per_member * n as f64 / 2000.0);
    Ok(())
}
