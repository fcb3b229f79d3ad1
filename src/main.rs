//! The `walrelay` binary: parses the command line and hands over to
//! [`walrelay::cli`].

fn main() -> std::process::ExitCode {
    walrelay::cli::main()
}
