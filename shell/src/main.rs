use std::process::ExitCode;

fn main() -> ExitCode {
    edgechat::cli::main()
}
