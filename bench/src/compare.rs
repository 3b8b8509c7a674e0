//! `compare`: the gRPC ceiling (tonic, no store), the mutex baseline and the node, started as
//! child processes and loaded alternately (A B C A B C ...) with the same settings, so the
//! ratios come from one run on one machine under the same background load.

use crate::{
    run,
    stats::{self, Report},
    LoadArgs,
};
use anyhow::{anyhow, Context};
use distributed_cache::pb::{node_service_client::NodeServiceClient, StatsRequest};
use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub struct CompareOpts {
    pub load: LoadArgs,
    pub rounds: u32,
    pub node_bin: Option<PathBuf>,
    pub node_env: Vec<(String, String)>,
    pub node_b_bin: Option<PathBuf>,
    pub node_b_env: Vec<(String, String)>,
    pub memory_keys: Option<u64>,
    pub json: Option<PathBuf>,
}

/// A server child process, killed and reaped on drop.
struct Server {
    label: &'static str,
    addr: String,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> anyhow::Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

fn node_bin(opt: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = opt {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let sibling = me.with_file_name("distributed-cache");
    if sibling.exists() {
        Ok(sibling)
    } else {
        Err(anyhow!(
            "no distributed-cache binary next to {}; build it (cargo build --release) or pass --node-bin",
            me.display()
        ))
    }
}

async fn wait_reachable(server: &mut Server) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.child.try_wait()? {
            return Err(anyhow!("{} exited at start with {status}", server.label));
        }
        let url = format!("http://{}", server.addr);
        if tonic::transport::Endpoint::from_shared(url)?
            .connect()
            .await
            .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "{} not reachable on {} within 20 s",
                server.label,
                server.addr
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_baseline(
    label: &'static str,
    store: &str,
    capacity: u64,
    value_bytes: u64,
) -> anyhow::Result<Server> {
    let addr = free_addr()?;
    let child = Command::new(std::env::current_exe()?)
        .args(["baseline", "--addr", &addr, "--store", store])
        .args([
            "--capacity",
            &capacity.to_string(),
            "--value-bytes",
            &value_bytes.to_string(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .context("starting a baseline server")?;
    let mut s = Server { label, addr, child };
    wait_reachable(&mut s).await?;
    Ok(s)
}

async fn start_node(
    label: &'static str,
    bin: &PathBuf,
    env: &[(String, String)],
    capacity: u64,
) -> anyhow::Result<Server> {
    let addr = free_addr()?;
    let mut cmd = Command::new(bin);
    cmd.env("ADDR", &addr)
        .env("CAPACITY", capacity.to_string())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut s = Server { label, addr, child };
    wait_reachable(&mut s).await?;
    Ok(s)
}

/// Per core of a node: requests answered on it (its ingress) and entries it owns.
async fn core_counts(addr: &str) -> anyhow::Result<Vec<(u64, u64)>> {
    let mut c = NodeServiceClient::connect(format!("http://{addr}")).await?;
    let stats = c.stats(StatsRequest {}).await?.into_inner();
    let mut cores = vec![(0, 0); stats.cores.len()];
    for cs in stats.cores {
        if let Some(slot) = cores.get_mut(cs.core as usize) {
            *slot = (cs.requests.iter().map(|r| r.count).sum(), cs.entries);
        }
    }
    Ok(cores)
}

/// Where a node round's requests went, from the node's own counters: the cores they arrived
/// on and, when they all aim at one key, whether its owner is another core (one hop each way).
#[derive(Debug, Clone, serde::Serialize)]
struct Path {
    ingress_cores: Vec<usize>,
    owner_cores: Vec<usize>,
    /// Some(true) when one key is loaded and no request arrived on its owning core.
    one_hop: Option<bool>,
}

fn path_of(before: &[(u64, u64)], after: &[(u64, u64)], keys: u64) -> Path {
    let ingress_cores: Vec<usize> = (0..after.len())
        .filter(|&i| after[i].0 > before.get(i).map_or(0, |b| b.0))
        .collect();
    let owner_cores: Vec<usize> = (0..after.len()).filter(|&i| after[i].1 > 0).collect();
    let one_hop =
        (keys == 1 && owner_cores.len() == 1).then(|| !ingress_cores.contains(&owner_cores[0]));
    Path {
        ingress_cores,
        owner_cores,
        one_hop,
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// (median, spread as (max - min) / median)
fn summarize(mut xs: Vec<f64>) -> (f64, f64) {
    let m = median(&mut xs);
    let spread =
        (xs.last().copied().unwrap_or(0.0) - xs.first().copied().unwrap_or(0.0)) / m.max(1e-9);
    (m, spread)
}

pub async fn compare(opts: CompareOpts) -> anyhow::Result<()> {
    let bin = node_bin(&opts.node_bin)?;
    let load_before = stats::loadavg();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "compare: {} connections x {} streams, keys {}, key {} B, value {} B, read ratio {}, {} rounds x {} s; {} cores, load average {}",
        opts.load.connections,
        opts.load.concurrency,
        opts.load.keys,
        opts.load.key_bytes,
        opts.load.value_bytes,
        opts.load.read_ratio,
        opts.rounds,
        opts.load.duration,
        cores,
        load_before
    );
    // Room for every key, so no store evicts during the measurement.
    let capacity = opts.load.keys.max(1000) * 2;
    let mut servers = vec![
        start_baseline("ceiling", "none", capacity, opts.load.value_bytes).await?,
        start_baseline("mutex", "mutex", capacity, opts.load.value_bytes).await?,
        start_node("node", &bin, &opts.node_env, capacity).await?,
    ];
    let variant = opts.node_b_bin.is_some() || !opts.node_b_env.is_empty();
    if variant {
        let bin_b = opts.node_b_bin.clone().unwrap_or_else(|| bin.clone());
        let env_b: Vec<(String, String)> = opts
            .node_env
            .iter()
            .chain(&opts.node_b_env)
            .cloned()
            .collect();
        servers.push(start_node("node-b", &bin_b, &env_b, capacity).await?);
    }
    // Pre-populate each store once, so Gets hit from the first round.
    for s in &servers {
        let mut o = opts.load.to_opts(vec![s.addr.clone()], true);
        // Pre-populating needs no routing; the baselines have no topology to follow.
        o.smart = false;
        o.prepopulate = true;
        o.duration = Duration::from_millis(1);
        o.warmup = Duration::ZERO;
        o.requests = Some(0);
        run::run(&o)
            .await
            .with_context(|| format!("pre-populating {}", s.label))?;
    }
    let mut results: Vec<Vec<Report>> = vec![Vec::new(); servers.len()];
    let mut paths: Vec<Vec<Path>> = vec![Vec::new(); servers.len()];
    for round in 1..=opts.rounds {
        for (i, s) in servers.iter().enumerate() {
            let is_node = s.label.starts_with("node");
            let before = if is_node {
                core_counts(&s.addr).await?
            } else {
                Vec::new()
            };
            let mut o = opts.load.to_opts(vec![s.addr.clone()], true);
            // --client smart applies to the nodes; the baselines only speak CacheService.
            o.smart &= is_node;
            let rep = run::run(&o)
                .await
                .with_context(|| format!("round {round} on {}", s.label))?;
            let path = if is_node {
                let p = path_of(&before, &core_counts(&s.addr).await?, opts.load.keys);
                let hop = match p.one_hop {
                    Some(true) => ", one hop",
                    Some(false) => ", local",
                    None => "",
                };
                let note = format!(
                    "  (arrived on cores {:?}, keys on {:?}{hop})",
                    p.ingress_cores, p.owner_cores
                );
                paths[i].push(p);
                note
            } else {
                String::new()
            };
            println!(
                "  round {round} {:<8} {:>10.0} req/s  p50 {:>5} us  p99 {:>6} us  errors {:?}{path}",
                s.label, rep.throughput_rps, rep.latency.p50_us, rep.latency.p99_us, rep.errors
            );
            results[i].push(rep);
        }
    }
    let load_after = stats::loadavg();

    let mut summary = Vec::new();
    println!("summary (median, spread = (max - min) / median):");
    for (s, reps) in servers.iter().zip(&results) {
        let (tput, tput_spread) = summarize(reps.iter().map(|r| r.throughput_rps).collect());
        let (p50, _) = summarize(reps.iter().map(|r| r.latency.p50_us as f64).collect());
        let (p99, p99_spread) = summarize(reps.iter().map(|r| r.latency.p99_us as f64).collect());
        println!(
            "  {:<8} {:>10.0} req/s (spread {:>4.1}%)  p50 {:>6.0} us  p99 {:>6.0} us (spread {:>4.1}%)",
            s.label,
            tput,
            tput_spread * 100.0,
            p50,
            p99,
            p99_spread * 100.0
        );
        summary.push(serde_json::json!({
            "server": s.label, "throughput_rps": tput, "throughput_spread": tput_spread,
            "p50_us": p50, "p99_us": p99, "p99_spread": p99_spread, "rounds": reps,
        }));
    }
    let t = |i: usize| summary[i]["throughput_rps"].as_f64().unwrap_or(0.0);
    let l = |i: usize, k: &str| summary[i][k].as_f64().unwrap_or(0.0);
    println!(
        "ratios: node/ceiling throughput {:.3}  node/mutex throughput {:.3}  node/ceiling p50 {:.3}  p99 {:.3}",
        t(2) / t(0).max(1e-9),
        t(2) / t(1).max(1e-9),
        l(2, "p50_us") / l(0, "p50_us").max(1e-9),
        l(2, "p99_us") / l(0, "p99_us").max(1e-9),
    );
    if variant {
        println!(
            "node-b/node: throughput {:.3}  p50 {:.3}  p99 {:.3}",
            t(3) / t(2).max(1e-9),
            l(3, "p50_us") / l(2, "p50_us").max(1e-9),
            l(3, "p99_us") / l(2, "p99_us").max(1e-9)
        );
    }
    // With one key and one connection, a round is either served on the core the connection
    // landed on or one hop away; the two are separate figures.
    let mut by_path = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        for (hop, name) in [(false, "local"), (true, "one hop")] {
            let reps: Vec<&Report> = results[i]
                .iter()
                .zip(&paths[i])
                .filter(|(_, p)| p.one_hop == Some(hop))
                .map(|(r, _)| r)
                .collect();
            if reps.is_empty() {
                continue;
            }
            let (p50, _) = summarize(reps.iter().map(|r| r.latency.p50_us as f64).collect());
            let (p99, _) = summarize(reps.iter().map(|r| r.latency.p99_us as f64).collect());
            println!(
                "  {:<8} {name:<7} ({} of {} rounds): p50 {p50:.0} us ({:.3} of the ceiling's)  p99 {p99:.0} us ({:.3})",
                s.label,
                reps.len(),
                results[i].len(),
                p50 / l(0, "p50_us").max(1e-9),
                p99 / l(0, "p99_us").max(1e-9)
            );
            by_path.push(serde_json::json!({
                "server": s.label, "path": name, "rounds": reps.len(), "p50_us": p50, "p99_us": p99,
                "p50_over_ceiling": p50 / l(0, "p50_us").max(1e-9),
                "p99_over_ceiling": p99 / l(0, "p99_us").max(1e-9),
            }));
        }
    }
    println!("load average before {load_before}  after {load_after}");
    servers.clear();

    let mut memory = serde_json::Value::Null;
    if let Some(n) = opts.memory_keys {
        memory = measure_memory(&opts, &bin, n).await?;
    }
    if let Some(path) = &opts.json {
        let doc = serde_json::json!({
            "settings": { "load": opts.load, "dist": opts.load.dist_name(), "rounds": opts.rounds,
                          "node_env": opts.node_env, "node_b_env": opts.node_b_env,
                          "node_b_bin": opts.node_b_bin, "cores": cores },
            "summary": summary,
            "ratios": {
                "node_over_ceiling_throughput": t(2) / t(0).max(1e-9),
                "node_over_mutex_throughput": t(2) / t(1).max(1e-9),
                "node_over_ceiling_p50": l(2, "p50_us") / l(0, "p50_us").max(1e-9),
                "node_over_ceiling_p99": l(2, "p99_us") / l(0, "p99_us").max(1e-9),
            },
            "by_path": by_path,
            "paths": paths,
            "memory": memory,
            "loadavg_before": load_before, "loadavg_after": load_after,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&doc)?)?;
    }
    Ok(())
}

/// Loads `n` keys into a fresh node (CAPACITY = n) and a fresh mutex baseline and reports RSS.
async fn measure_memory(
    opts: &CompareOpts,
    bin: &PathBuf,
    n: u64,
) -> anyhow::Result<serde_json::Value> {
    let payload = n * (opts.load.key_bytes + opts.load.value_bytes);
    let mut out = Vec::new();
    for which in ["node", "mutex"] {
        let server = match which {
            "node" => start_node("node", bin, &opts.node_env, n).await?,
            _ => start_baseline("mutex", "mutex", n, opts.load.value_bytes).await?,
        };
        let idle = stats::rss_bytes(server.child.id()).unwrap_or(0);
        let mut o = opts.load.to_opts(vec![server.addr.clone()], true);
        o.smart = false;
        o.workload.keys = n;
        o.prepopulate = true;
        o.duration = Duration::from_millis(1);
        o.warmup = Duration::ZERO;
        o.requests = Some(0);
        run::run(&o)
            .await
            .with_context(|| format!("loading {n} keys into {which}"))?;
        let rss = stats::rss_bytes(server.child.id()).unwrap_or(0);
        println!(
            "memory {which:<6} {n} keys of {} B + {} B: RSS {:.1} MB (idle {:.1} MB), {:.1} bytes/entry, {:.2}x the payload",
            opts.load.key_bytes,
            opts.load.value_bytes,
            rss as f64 / 1e6,
            idle as f64 / 1e6,
            rss as f64 / n as f64,
            rss as f64 / payload as f64
        );
        out.push(serde_json::json!({ "server": which, "keys": n, "rss_bytes": rss, "idle_rss_bytes": idle,
            "bytes_per_entry": rss as f64 / n as f64, "payload_ratio": rss as f64 / payload as f64 }));
    }
    Ok(serde_json::Value::Array(out))
}
