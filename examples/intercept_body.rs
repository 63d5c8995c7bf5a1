//! Request interception: a caller's own tiny_http loop reads the `/chat_stream` body first
//! (to log, filter or rewrite it), then hands it to `ChatStream` with
//! `handle_chat_stream_request(request, Some(body), None)`.
//!
//! Run: `cargo run --release --example intercept_body` (mock model on 127.0.0.1:8001), then
//! `curl -N -X POST localhost:8001/chat_stream -d '{"user_input":"hello"}'`.

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use chatstream::server::model::{MockChat, MockMode};
use chatstream::server::{ChatStream, ServerConfig};

fn main() {
    let cs = ChatStream::new(
        ServerConfig::default(),
        Arc::new(MockChat::new(MockMode::Echo, Duration::from_millis(30))),
    );
    let server = tiny_http::Server::http("127.0.0.1:8001").expect("binding 127.0.0.1:8001");
    eprintln!("intercept_body: listening on http://127.0.0.1:8001");
    for mut req in server.incoming_requests() {
        if req.url() != "/chat_stream" {
            cs.handle(req);
            continue;
        }
        let mut body = Vec::new();
        if req
            .as_reader()
            .take(1 << 20)
            .read_to_end(&mut body)
            .is_err()
        {
            continue;
        }
        // The interception point: here we only log the size; a real caller might refuse,
        // redact or rewrite the message before passing it on.
        eprintln!("intercept_body: /chat_stream body of {} bytes", body.len());
        cs.handle_chat_stream_request(req, Some(body), None);
    }
}
