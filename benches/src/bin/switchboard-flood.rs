//! `switchboard-flood`: the connection and message load generator. See `--help` and
//! `switchboard_benches::controller`.

use std::process::ExitCode;

use clap::Parser;
use switchboard_benches::controller::{self, Args};

fn main() -> ExitCode {
    let args = Args::parse();
    let r = match &args.worker {
        Some(which) => controller::worker_main(which),
        None => controller::run(args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchboard-flood: {e:#}");
            ExitCode::FAILURE
        }
    }
}
