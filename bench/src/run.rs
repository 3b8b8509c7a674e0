//! The load generator: `connections` HTTP/2 connections spread over the targets, `concurrency`
//! streams in flight on each, closed loop or open loop at a fixed rate. In open loop each
//! request's latency counts from when it was due, not when it was sent, so a stall shows
//! (no coordinated omission).

use crate::{
    stats::{report, Recorder, Report},
    workload::{key_for, value_of, Generator, Op, Workload},
};
use anyhow::{anyhow, Context};
use distributed_cache::pb::{
    cache_service_client::CacheServiceClient, set_request, DeleteRequest, GetRequest, SetRequest,
};
use std::{
    io::IsTerminal,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use tonic::{transport::Channel, Code};

#[derive(Debug, Clone)]
pub struct RunOpts {
    pub targets: Vec<String>,
    pub connections: usize,
    pub concurrency: usize,
    /// Requests per second over all workers; None = closed loop.
    pub rate: Option<f64>,
    pub workload: Workload,
    pub duration: Duration,
    /// Stop after this many measured requests (before `duration` if sooner).
    pub requests: Option<u64>,
    pub warmup: Duration,
    pub prepopulate: bool,
    pub rpc_timeout: Duration,
    pub seed: u64,
    pub quiet: bool,
}

type Client = CacheServiceClient<Channel>;

async fn connect(target: &str, timeout: Duration) -> anyhow::Result<Client> {
    let url = format!("http://{target}");
    let channel = Channel::from_shared(url)
        .map_err(|e| anyhow!("invalid target {target}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| anyhow!("target {target} is unreachable: {e}"))?;
    Ok(CacheServiceClient::new(channel))
}

/// One connection per entry, round-robin over the targets.
pub async fn connect_all(opts: &RunOpts) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::with_capacity(opts.connections);
    for i in 0..opts.connections {
        let target = &opts.targets[i % opts.targets.len()];
        let c = tokio::time::timeout(
            opts.rpc_timeout + Duration::from_secs(1),
            connect(target, opts.rpc_timeout),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "target {target} is unreachable: no answer within {:?}",
                opts.rpc_timeout
            )
        })??;
        clients.push(c);
    }
    Ok(clients)
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
}

/// Sets every key once, spread over the connections.
pub async fn prepopulate(clients: &[Client], w: &Workload, parallel: usize) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let value = value_of(w.value_bytes);
    let mut tasks = Vec::new();
    for i in 0..parallel.max(1) {
        let mut c = clients[i % clients.len()].clone();
        let next = Arc::clone(&next);
        let value = value.clone();
        let (keys, first_key, key_bytes) = (w.keys, w.first_key, w.key_bytes);
        tasks.push(tokio::spawn(async move {
            loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= keys {
                    return Ok::<_, anyhow::Error>(());
                }
                let k = k + first_key;
                c.set(SetRequest {
                    key: key_for(k, key_bytes),
                    payload: Some(set_request::Payload::Value(value.clone())),
                    ttl_seconds: None,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("pre-populating key {k}"))?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

struct Phase {
    stop: AtomicBool,
    budget: AtomicU64,
    done: AtomicU64,
}

async fn worker(
    mut client: Client,
    mut generator: Generator,
    w: Workload,
    phase: Arc<Phase>,
    interval: Option<Duration>,
    start: Instant,
) -> Recorder {
    let mut rec = Recorder::default();
    let value = value_of(w.value_bytes);
    let mut due = start;
    while !phase.stop.load(Ordering::Relaxed) {
        if phase
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| b.checked_sub(1))
            .is_err()
        {
            break;
        }
        let sent_from = match interval {
            Some(iv) => {
                due += iv;
                let now = Instant::now();
                if due > now {
                    tokio::time::sleep_until(due.into()).await;
                }
                due
            }
            None => Instant::now(),
        };
        let key = key_for(generator.key_index(), w.key_bytes);
        let op = generator.op();
        let outcome = match op {
            Op::Get => client
                .get(GetRequest {
                    key,
                    ..Default::default()
                })
                .await
                .map(|_| true),
            Op::Set => client
                .set(SetRequest {
                    key,
                    payload: Some(set_request::Payload::Value(value.clone())),
                    ttl_seconds: None,
                    ..Default::default()
                })
                .await
                .map(|_| false),
            Op::Delete => client
                .delete(DeleteRequest {
                    key,
                    ..Default::default()
                })
                .await
                .map(|_| false),
        };
        rec.record_latency(sent_from.elapsed().as_micros() as u64);
        match outcome {
            Ok(hit) => {
                rec.ok += 1;
                if op == Op::Get {
                    rec.gets += 1;
                    rec.hits += hit as u64;
                }
            }
            Err(status) if op == Op::Get && status.code() == Code::NotFound => {
                rec.ok += 1;
                rec.gets += 1;
            }
            Err(status) => *rec.errors.entry(code_name(status.code())).or_default() += 1,
        }
        phase.done.fetch_add(1, Ordering::Relaxed);
    }
    rec
}

async fn run_phase(
    clients: &[Client],
    opts: &RunOpts,
    length: Duration,
    budget: Option<u64>,
    seed: u64,
    show_progress: bool,
) -> (Recorder, f64) {
    let workers = opts.connections * opts.concurrency;
    let phase = Arc::new(Phase {
        stop: AtomicBool::new(false),
        budget: AtomicU64::new(budget.unwrap_or(u64::MAX)),
        done: AtomicU64::new(0),
    });
    let interval = opts
        .rate
        .map(|r| Duration::from_secs_f64(workers as f64 / r));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(workers);
    for i in 0..workers {
        let client = clients[i % clients.len()].clone();
        let generator = Generator::new(
            &opts.workload,
            seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
        );
        tasks.push(tokio::spawn(worker(
            client,
            generator,
            opts.workload.clone(),
            Arc::clone(&phase),
            interval,
            start,
        )));
    }
    let progress = show_progress.then(|| {
        let phase = Arc::clone(&phase);
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let done = phase.done.load(Ordering::Relaxed);
                eprint!(
                    "\r  {:>6.1}s  {:>10} req/s  {:>12} requests",
                    start.elapsed().as_secs_f64(),
                    done - last,
                    done
                );
                last = done;
            }
        })
    });
    // Stop on time, or when the request budget runs out (workers then exit by themselves).
    let deadline = start + length;
    while Instant::now() < deadline && phase.budget.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(
            Duration::from_millis(10).min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    phase.stop.store(true, Ordering::Relaxed);
    let mut total = Recorder::default();
    for t in tasks {
        if let Ok(rec) = t.await {
            total.merge(&rec);
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    (total, seconds)
}

/// Connects, pre-populates if asked, warms up (not counted), then measures.
pub async fn run(opts: &RunOpts) -> anyhow::Result<Report> {
    let clients = connect_all(opts).await?;
    if opts.prepopulate {
        prepopulate(
            &clients,
            &opts.workload,
            opts.connections * opts.concurrency,
        )
        .await?;
    }
    if !opts.warmup.is_zero() {
        run_phase(&clients, opts, opts.warmup, None, opts.seed ^ 0x5eed, false).await;
    }
    let show = !opts.quiet && std::io::stderr().is_terminal();
    let (rec, seconds) = run_phase(
        &clients,
        opts,
        opts.duration,
        opts.requests,
        opts.seed,
        show,
    )
    .await;
    Ok(report(&rec, seconds))
}
