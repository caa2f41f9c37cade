//! `switchboard`: the gateway daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use switchboard_gateway::config::{Config, Overrides};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Switchboard gateway: pinned shards, Noise binary protocol, durable store-and-forward.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (every key can also be given as a flag below).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Print the merged configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    overrides: Overrides,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut cfg = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("switchboard: {e}");
            return ExitCode::from(2);
        }
    };
    cfg.apply(&cli.overrides);
    if let Err(e) = cfg.validate() {
        eprintln!("switchboard: {e}");
        return ExitCode::from(2);
    }
    if cli.print_config {
        match toml::to_string_pretty(&cfg) {
            Ok(s) => {
                print!("{s}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("switchboard: {e}");
                return ExitCode::from(2);
            }
        }
    }
    init_logging(&cfg);
    match switchboard_gateway::runtime::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "switchboard failed");
            eprintln!("switchboard: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log_filter));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}
