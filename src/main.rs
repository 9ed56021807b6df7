//! The `apijongler` command: parse, set up logging, run, map the outcome to an exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    cli::init_logging(&args.global);
    match cli::run(args) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("apijongler: {error:#}");
            ExitCode::from(cli::exit::FAILURE)
        }
    }
}
