//! `event-sink`: a subscriber app as its own process, for tests that `kill -9` it. It
//! subscribes to one topic and appends each event's payload as a line to a file before it
//! answers SUCCESS, so a killed sink loses no acknowledged event (the lines are in the OS's
//! page cache the moment `write` returns).
//!
//! Usage: `event-sink PORT PUBSUB TOPIC FILE`

use std::io::Write;
use std::sync::{Arc, Mutex};

use tandem_sdk::{AppServer, EventOutcome};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port, pubsub, topic, file] = args.as_slice() else {
        eprintln!("usage: event-sink PORT PUBSUB TOPIC FILE");
        std::process::exit(2);
    };
    let out = std::fs::OpenOptions::new().create(true).append(true).open(file).unwrap_or_else(|e| {
        eprintln!("event-sink: cannot open {file}: {e}");
        std::process::exit(2);
    });
    let out = Arc::new(Mutex::new(out));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port.parse::<u16>().expect("PORT is a number")))
        .await
        .unwrap_or_else(|e| {
            eprintln!("event-sink: cannot bind port {port}: {e}");
            std::process::exit(2);
        });
    let server = AppServer::new().subscribe(pubsub, topic, move |event| {
        let out = out.clone();
        async move {
            let mut line = event.data;
            line.push(b'\n');
            match out.lock().unwrap_or_else(|p| p.into_inner()).write_all(&line) {
                Ok(()) => EventOutcome::Success,
                Err(_) => EventOutcome::Retry,
            }
        }
    });
    server.serve(listener, std::future::pending()).await;
}
