use clap::Parser;
use consilium_backend::cli::{Cli, run};

fn main() {
    // Started again as a decoding child (simulated sites read their files through it).
    consilium_worker::decode::serve_if_child();
    server_main();
}

#[tokio::main]
async fn server_main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
