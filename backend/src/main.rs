use clap::Parser;
use consilium_backend::cli::{Cli, run};

/// Training allocates and frees large tensors every step; jemalloc keeps freed memory for a
/// while instead of returning it to the kernel and faulting it back in (a quarter of CPU
/// training time with the system allocator).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
