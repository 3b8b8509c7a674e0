//! The `distributed-cache` binary. Bare (or `serve`): read the configuration, set up logs, run
//! the node until a signal (SIGHUP reloads certificates and tokens); a start-up failure is one line on stderr (exit 2 for
//! configuration, 1 otherwise). With a subcommand: an operator's client (see `--help`).
//! Runs on the main thread; the node's own threads are started by [`node::run`].

use clap::Parser;
use distributed_cache::{
    cli, config::Config, engine::log, node, observability, security::Material,
};

fn main() {
    let args = cli::Cli::parse();
    match args.command {
        None | Some(cli::Command::Serve) => serve(),
        Some(command) => {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("distributed-cache: cannot start a runtime: {e}");
                    std::process::exit(1);
                }
            };
            if let Err(e) = runtime.block_on(cli::run(command)) {
                eprintln!("distributed-cache: {e:#}");
                std::process::exit(1);
            }
        }
    }
}

fn serve() {
    let config = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("distributed-cache: {e}");
            std::process::exit(2);
        }
    };
    // Certificates, keys and tokens are read before anything starts: a bad file is a
    // configuration error, one line naming its variable and path.
    let material = match Material::load(&config.security) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("distributed-cache: {e}");
            std::process::exit(2);
        }
    };
    let (budget, shards) = (config.memory.max_bytes, config.num_shards);
    if let Err((len, e)) = log::check_address_space(budget as usize, shards as usize) {
        eprintln!(
            "distributed-cache: MAX_MEMORY={budget} over {shards} shards needs {len} bytes of \
             address space (reserved, not used), which this process cannot have: {e}"
        );
        std::process::exit(2);
    }
    observability::init_logging(config.log_format);
    log::fix_malloc_mmap_threshold();
    if let Err(e) = node::run(config, material) {
        eprintln!("distributed-cache: {e:#}");
        std::process::exit(1);
    }
}
