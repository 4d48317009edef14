//! `stand_in_service`: a process that takes a pipeline service's command line (`--app-port
//! PORT --sidecar URL` and any service flags) and serves the callback API there, answering
//! `status` with what it was started with. The CLI tests put it in a bin dir under the names
//! of the pipeline's services to exercise `tandem up`'s process management (start, watch,
//! stop) without the pipeline's own work.
//!
//! Usage: `stand_in_service --app-port PORT --sidecar URL [SERVICE FLAGS...]`

use tandem_sdk::{AppServer, Reply};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let name = std::path::Path::new(&args[0]).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let flag = |wanted: &str| args.iter().position(|a| a == wanted).and_then(|i| args.get(i + 1)).cloned();
    let Some(port) = flag("--app-port").and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("{name}: --app-port PORT is required");
        std::process::exit(2);
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap_or_else(|e| {
        eprintln!("{name}: cannot bind port {port}: {e}");
        std::process::exit(2);
    });
    println!("{name}: serving on 127.0.0.1:{port}, sidecar {:?}", flag("--sidecar"));
    let status = serde_json::json!({ "stand_in": name, "args": args[1..] }).to_string();
    let server = AppServer::new().handler("status", move |_| {
        let status = status.clone();
        async move { Ok(Reply { content_type: "application/json".into(), ..Reply::bytes(status.into_bytes()) }) }
    });
    server.serve(listener, std::future::pending()).await;
}
