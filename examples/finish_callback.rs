//! Finish callbacks: every admitted `/chat_stream` request reports exactly one outcome
//! (`success`, `client_disconnected_while_streaming`, `client_disconnected_before_streaming`
//! or `unknown_error_occurred`) to the callback the caller passes.
//!
//! Run: `cargo run --release --example finish_callback` (mock model on 127.0.0.1:8002), then
//! `curl -N -X POST localhost:8002/chat_stream -d '{"user_input":"hi"}'` and press Ctrl-C in
//! curl half-way to see `client_disconnected_while_streaming`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chatstream::server::model::{MockChat, MockMode};
use chatstream::server::{ChatStream, FinishOutcome, ServerConfig};

fn main() {
    let cs = ChatStream::new(
        ServerConfig::default(),
        Arc::new(MockChat::new(MockMode::Long, Duration::from_millis(50))),
    );
    let server = tiny_http::Server::http("127.0.0.1:8002").expect("binding 127.0.0.1:8002");
    let successes = Arc::new(AtomicUsize::new(0));
    eprintln!("finish_callback: listening on http://127.0.0.1:8002");
    for req in server.incoming_requests() {
        if req.url() != "/chat_stream" {
            cs.handle(req);
            continue;
        }
        let successes = Arc::clone(&successes);
        let callback = Box::new(move |outcome: FinishOutcome| {
            if outcome == FinishOutcome::Success {
                successes.fetch_add(1, Ordering::SeqCst);
            }
            eprintln!(
                "finish_callback: outcome={} (successes so far: {})",
                outcome.as_str(),
                successes.load(Ordering::SeqCst)
            );
        });
        cs.handle_chat_stream_request(req, None, Some(callback));
    }
}
