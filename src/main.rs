//! The `lvlm-ift` binary: run the CLI, print the whole error chain on failure.

use std::process::ExitCode;

fn main() -> ExitCode {
    lvlm_ift::malloc_tuning::apply();
    match lvlm_ift::cli::run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
