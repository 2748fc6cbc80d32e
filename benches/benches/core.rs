//! Core benches on realistic 3.8 KB and 8 KB events: bare HMAC-SHA256 next to `Verifier::verify`,
//! `parse`, verify + parse, a forged-signature rejection, `decide`, and the in-memory `receive`.
//!
//! `cargo bench -p mindroom-billing-benches -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeZone, Utc};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use hmac::{Hmac, Mac};
use mindroom_billing_benches::{fixture, with_distinct_ids};
use mindroom_billing_core::dryrun::{DryRunProvisioner, LogNotifier};
use mindroom_billing_core::signature::sign;
use mindroom_billing_core::{
    Billing, BillingConfig, Clock, MemoryStore, Policy, PriceCatalog, Tier, Verifier, WebhookSecret, decide, parse,
};
use sha2::Sha256;

const SECRET: &str = "whsec_test_7f3b2c9d4e5a6b7c8d9e0f1a2b3c4d5e";
const NOW: i64 = 1_785_000_300;

const EVENTS: [(&str, &str, &str); 2] = [
    ("checkout_3.8KB", "2023-10-16", "checkout.session.completed"),
    ("sub_updated_8KB", "2026-07-29.dahlia", "customer.subscription.updated"),
];

fn policy() -> Policy {
    Policy::default().with_prices(
        PriceCatalog::new()
            .with_price("price_1PgafmB7WZ01zgkW6dKueIc5", Tier::Starter)
            .with_price("price_1PgagYB7WZ01zgkWq2Lx9Rz4", Tier::Professional),
    )
}

fn verify_and_parse(c: &mut Criterion) {
    let secret = WebhookSecret::new(SECRET);
    let verifier = Verifier::new([secret.clone()]);
    for (label, version, name) in EVENTS {
        let body = fixture(version, name);
        let header = sign(&secret, &body, NOW);
        let forged = sign(&WebhookSecret::new("whsec_attacker"), &body, NOW);
        let t = NOW.to_string();
        let mut group = c.benchmark_group(format!("core/{label}"));
        group.throughput(Throughput::Bytes(u64::try_from(body.len()).unwrap()));
        group.bench_function("hmac_sha256_bare", |b| {
            b.iter(|| {
                let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
                mac.update(t.as_bytes());
                mac.update(b".");
                mac.update(black_box(&body));
                black_box(mac.finalize().into_bytes())
            });
        });
        group.bench_function("verify", |b| b.iter(|| verifier.verify(Some(black_box(&header)), black_box(&body), NOW)));
        group.bench_function("verify_forged_rejected", |b| {
            b.iter(|| verifier.verify(Some(black_box(&forged)), black_box(&body), NOW).unwrap_err());
        });
        group.bench_function("parse", |b| b.iter(|| parse(black_box(&body)).unwrap()));
        group.bench_function("verify_parse", |b| {
            b.iter(|| {
                verifier.verify(Some(black_box(&header)), black_box(&body), NOW).unwrap();
                parse(black_box(&body)).unwrap()
            });
        });
        group.finish();
    }
}

fn transition(c: &mut Criterion) {
    let policy = policy();
    let now = Utc.timestamp_opt(NOW, 0).unwrap();
    let created = parse(&fixture("2026-07-29.dahlia", "customer.subscription.created")).unwrap();
    let updated = parse(&fixture("2026-07-29.dahlia", "customer.subscription.updated")).unwrap();
    let failed = parse(&fixture("2026-07-29.dahlia", "invoice.payment_failed")).unwrap();
    let state = decide(&policy, None, &created, now).subscription.unwrap();
    let mut group = c.benchmark_group("core/decide");
    group.bench_function(BenchmarkId::new("subscription", "new"), |b| {
        b.iter(|| decide(&policy, None, black_box(&created), now));
    });
    group.bench_function(BenchmarkId::new("subscription", "upgrade"), |b| {
        b.iter(|| decide(&policy, Some(black_box(&state)), black_box(&updated), now));
    });
    group.bench_function(BenchmarkId::new("invoice", "payment_failed"), |b| {
        b.iter(|| decide(&policy, Some(black_box(&state)), black_box(&failed), now));
    });
    group.finish();
}

#[derive(Debug)]
struct FixedClock(DateTime<Utc>);

impl Clock for FixedClock {
    fn now(&self) -> DateTime<Utc> {
        self.0
    }
}

fn receive(c: &mut Criterion) {
    /// Fresh store every this many events, so memory stays bounded (store setup is not timed).
    const CHUNK: u64 = 10_000;
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let secret = WebhookSecret::new(SECRET);
    let now = Utc.timestamp_opt(NOW, 0).unwrap();
    let mut group = c.benchmark_group("core/receive_in_memory");
    for (label, version, name) in EVENTS {
        let body = fixture(version, name);
        let mut next_id = 0usize;
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    let n = (iters - done).min(CHUNK);
                    let count = usize::try_from(n).unwrap();
                    // Distinct event ids: every delivery is a new event, never a duplicate.
                    let payloads: Vec<(String, Vec<u8>)> = with_distinct_ids(&body, next_id..next_id + count)
                        .into_iter()
                        .map(|p| (sign(&secret, &p, NOW), p))
                        .collect();
                    next_id += count;
                    let billing = Billing::new(
                        Arc::new(MemoryStore::new()),
                        Arc::new(DryRunProvisioner::default()),
                        Arc::new(LogNotifier),
                        BillingConfig::new(Verifier::new([secret.clone()])).with_policy(policy()),
                    )
                    .with_clock(Arc::new(FixedClock(now)));
                    let started = Instant::now();
                    runtime.block_on(async {
                        for (header, payload) in &payloads {
                            black_box(billing.receive(Some(header), payload).await.unwrap());
                        }
                    });
                    total += started.elapsed();
                    drop(billing);
                    done += n;
                }
                total
            });
        });
    }
    group.finish();
}

// criterion's macros generate undocumented `pub fn`s.
mod generated {
    #![allow(missing_docs)]
    use super::*;
    criterion_group!(benches, verify_and_parse, transition, receive);
}
criterion_main!(generated::benches);
