//! The `latus` command: parses arguments, sets up logging, runs a command and turns
//! its error into one line and a non-zero exit code.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Args::parse();
    // Dropped at the end of main: the file log is flushed after the command.
    let _log_guard = cli::init_logging(&args);
    match cli::run(args) {
        Ok(code) => code,
        Err(err) => {
            // One line: the whole cause chain, joined by ": ".
            eprintln!("latus: error: {err:#}");
            ExitCode::from(cli::EXIT_ERROR)
        }
    }
}
