//! `dspex_grpc`: the gateway process. Started by `DSPex.Bridge.Gateway`
//! (an Erlang port: `{:packet, 4}` frames of Erlang terms on stdin/stdout, see
//! `dspex_grpc::link`); exits when its stdin closes.
//!
//! Usage: `dspex_grpc [--ip A] [--port N] [--tls-cert PEM --tls-key PEM]
//! [--max-message-bytes N] [--max-concurrency N] [--max-streams N]
//! [--stream-window N] [--max-in-flight N] [--max-frame-bytes N] [--threads N]`

use std::process::ExitCode;

fn main() -> ExitCode {
    let config = match dspex_grpc::server::Config::from_args(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dspex_grpc: {e}\n{}", dspex_grpc::server::USAGE);
            return ExitCode::from(2);
        }
    };
    match dspex_grpc::server::run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dspex_grpc: {e}");
            ExitCode::from(1)
        }
    }
}
