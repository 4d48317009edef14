//! `tandem`: see the tandem-cli crate docs (`tandem --help`).

use std::process::ExitCode;

use clap::Parser;
use tandem_cli::{ExitKind, args::Cli};

// One thread: `tandem up` ties each child's PR_SET_PDEATHSIG to the thread that started it, so
// that thread must live as long as the process; and nothing here needs more.
#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match tandem_cli::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            match error.kind {
                ExitKind::Interrupted(_) => eprintln!("tandem: {error}; everything it started is stopped"),
                _ => eprintln!("tandem: error: {error}"),
            }
            ExitCode::from(error.kind.code())
        }
    }
}
