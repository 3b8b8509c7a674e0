//! Starting and stopping a node: prerequisites, the cores, the control plane, and the signal
//! handling around them. Runs on the main thread, which only waits once the cores are up.
//!
//! - [`core`]: what one core runs, from start to stop.

pub mod core;

use self::core::{per_core, CoreSetup};
use crate::security::Material;
use crate::{
    cluster::{ring::Ring, views::cluster_views},
    config::Config,
    control::{self, cores::Cores, ControlPlane},
    ingress,
};
use anyhow::Context as _;
use executors::{allowed_cores, check_prerequisites, ExecutorOptions, Mesh};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::{
    sync::{atomic::AtomicUsize, Arc},
    time::{Duration, Instant},
};

/// Questions the control plane may have queued on one core: a scrape, an anti-entropy step,
/// the peer-control calls in flight; more wait for room.
const CONTROL_QUEUE_DEPTH: usize = 64;

/// Shards the node will run: NUM_SHARDS, raised to the core count when lower, because a core
/// without a shard would only forward, adding a hop to every request it accepts.
pub fn effective_shards(num_shards: u32, nr_cores: usize) -> u32 {
    num_shards.max(nr_cores as u32)
}

/// Runs a node until SIGINT or SIGTERM, then drains and returns. A second signal exits at once.
/// SIGHUP reloads the TLS files and the tokens (`material` is what start-up loaded).
pub fn run(config: Config, material: Material) -> anyhow::Result<()> {
    // Registered first, so a signal during start-up already means "shut down" and never kills
    // the process half-started (a SIGHUP then is taken as a reload once the node runs).
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing signal handlers")?;
    if let Some(secret) = &config.security.cluster {
        crate::cluster::peer::unary::set_member_credential(secret.credential());
    } else if config.security.tokens_file.is_some() {
        tracing::warn!(
            "AUTH_TOKENS_FILE without CLUSTER_SECRET: PeerService stays open to anyone who can reach ADDR"
        );
    }

    check_prerequisites()?;
    let cpus = allowed_cores(config.cores)?;
    let nr_cores = cpus.len();
    let num_shards = effective_shards(config.num_shards, nr_cores);
    if num_shards != config.num_shards {
        tracing::warn!(
            configured = config.num_shards,
            used = num_shards,
            cores = nr_cores,
            "NUM_SHARDS below the core count; raised so every core owns a shard"
        );
    }

    // Before the control plane: NodeService.Layout tells the port to peers and clients.
    let (shard_port, shard_listeners) = match config.shard_port {
        None => (0, Vec::new()),
        Some(port) => match crate::routing::steer::listen(config.listen_addr, port, nr_cores) {
            Ok(listening) => listening,
            Err(e) if port == 0 => {
                tracing::warn!(error = %e, "no shard-aware port: peers reach this node's cores with one hop");
                (0, Vec::new())
            }
            Err(e) => anyhow::bail!("cannot listen on SHARD_PORT {port}: {e}"),
        },
    };
    let (view_publishers, views) = cluster_views(Ring::new(
        [config.addr.clone()],
        config.vnodes,
        config.replication_factor,
    ));
    let (sharded, inboxes) = executors::sharded(nr_cores, CONTROL_QUEUE_DEPTH);
    let (forwarder, forwarded) = ingress::forwarder();
    let control = ControlPlane::start(
        control::Settings {
            me: config.addr.clone(),
            bind: config.listen_addr,
            seeds: config.peers.clone(),
            dead_after: config.dead_node_timeout,
            vnodes: config.vnodes,
            replication_factor: config.replication_factor,
            write_quorum: config.write_quorum,
            read_quorum: config.read_quorum,
            num_shards,
            nr_cores,
            shard_port,
            anti_entropy_interval: config.anti_entropy_interval,
            transition: config.transition(),
            metrics_addr: config.metrics_addr,
            memory: config.memory,
            cluster: config.security.cluster.clone(),
        },
        Cores {
            sharded,
            num_shards,
        },
        forwarded,
        view_publishers,
    )?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = crossbeam_channel::unbounded();
    let limiter = config.rate_limit.map(|per_sec| {
        Arc::new(governor::RateLimiter::direct(
            governor::Quota::per_second(per_sec).allow_burst(config.rate_limit_burst),
        ))
    });
    let setup = CoreSetup {
        config: Arc::new(config.clone()),
        num_shards,
        node_id: (xxhash_rust::xxh3::xxh3_64(config.addr.as_bytes()) >> 32) as u32,
        epoch: Instant::now(),
        mesh: Mesh::new(nr_cores, config.queue_depth),
        forwarder,
        limiter,
        shutdown: shutdown_rx,
        ready: ready_tx,
        drained: Arc::new(AtomicUsize::new(0)),
        inboxes: per_core(inboxes),
        views,
        shard_listeners: per_core(shard_listeners),
        security: material,
    };
    let options = ExecutorOptions {
        spin_before_park: config.spin_before_park,
        ..ExecutorOptions::default()
    };
    let executors = executors::start(&cpus, &options, move |_core| {
        self::core::run_core(setup.clone())
    })?;

    let mut failure = None;
    for _ in 0..nr_cores {
        match ready_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(_) => failure = failure.or(Some("a core did not start within 30 s".to_string())),
        }
    }
    if let Some(reason) = failure {
        let _ = shutdown_tx.send(true);
        executors.join();
        control.stop();
        anyhow::bail!(reason);
    }
    tracing::info!(
        addr = %config.addr,
        listen = %config.listen_addr,
        shard_port,
        cores = ?cpus.iter().map(|c| c.0).collect::<Vec<_>>(),
        shards = num_shards,
        max_memory = config.memory.max_bytes,
        capacity = config.memory.max_entries.unwrap_or(0),
        eviction = ?config.memory.policy,
        ttl_secs = config.ttl_secs.unwrap_or(0),
        rate_limit = config.rate_limit.map(|r| r.get()).unwrap_or(0),
        metrics = %config.metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "off".into()),
        "distributed-cache listening"
    );

    let first = loop {
        match signals.forever().next() {
            Some(SIGHUP) => reload(&config, &control),
            other => break other,
        }
    };
    tracing::info!(signal = ?first, "shutting down: leaving the cluster, then draining");
    // Peers first stop routing here, then the node drains what is in flight.
    control.leave(Duration::from_secs(2));
    // What this node holds goes to the nodes taking over before it stops serving.
    control.hand_off_all(config.shutdown_timeout);
    control.set_not_serving();
    let _ = shutdown_tx.send(true);
    std::thread::Builder::new()
        .name("second-signal".into())
        .spawn(move || {
            if signals.forever().any(|signal| signal != SIGHUP) {
                eprintln!("second signal: exiting at once");
                std::process::exit(130);
            }
        })?;

    let mut panicked = false;
    for result in executors.join() {
        match result {
            Ok(Some(exit)) if exit.connections_left > 0 => {
                tracing::warn!(
                    core = exit.core,
                    open = exit.connections_left,
                    "connections cut at shutdown timeout"
                );
            }
            Ok(_) => {}
            Err(_) => panicked = true,
        }
    }
    control.stop();
    if panicked {
        anyhow::bail!("a core panicked during shutdown");
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: reads the TLS files and tokens again and gives them to every core. A file that no
/// longer loads leaves the node as it was, and says why.
fn reload(config: &Config, control: &ControlPlane) {
    match Material::load(&config.security) {
        Err(e) => {
            tracing::error!(error = %e, "reload refused; keeping the certificates and tokens in force")
        }
        Ok(material) => {
            let tokens = material.tokens.as_ref().map_or(0, |t| t.len());
            let cores = control.install_security(material);
            tracing::info!(cores, tokens, "certificates and tokens reloaded");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_raised_to_the_core_count() {
        assert_eq!(effective_shards(1, 2), 2);
        assert_eq!(effective_shards(64, 2), 64);
        assert_eq!(effective_shards(3, 2), 3);
    }
}
