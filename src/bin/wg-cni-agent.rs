//! The node agent's binary (see `wg_cni::agent`).

fn main() -> std::process::ExitCode {
    wg_cni::agent::cli::main()
}
