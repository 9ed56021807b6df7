//! The `apijongler` command: parse, set up logging, run, map the outcome to an exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    cli::init_logging(&args);
    match cli::run(args) {
        Ok(code) => code,
        // Output piped into `head` that stops reading is not a failure.
        Err(error) if is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("apijongler: {error:#}");
            ExitCode::from(cli::exit::code_for(&error))
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
