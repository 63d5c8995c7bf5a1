//! A small HTTP/1.1 client over a real `TcpStream` for the server tests, and a test server
//! that runs `ChatStream` on 127.0.0.1:0 behind the connection guard, in its own tiny_http
//! loop, recording every finish outcome through the library's per-request callback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chatstream::server::guard::{ConnLimits, Guard, SocketDir};
use chatstream::server::model::ChatModel;
use chatstream::server::{ChatStream, FinishOutcome, ServerConfig};
use serde_json::Value;

/// A response read in full.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text()))
    }
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone()).unwrap()
    }
    /// The `sid=...` cookie the response sets, as a `Cookie` header value.
    pub fn cookie(&self) -> Option<String> {
        self.header("Set-Cookie")
            .map(|c| c.split(';').next().unwrap().to_string())
    }
}

/// An open response whose body is read chunk by chunk.
pub struct Stream {
    reader: BufReader<TcpStream>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    chunked: bool,
}

impl Stream {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The next chunk of a chunked body; `None` at its end.
    pub fn next_chunk(&mut self) -> Option<Vec<u8>> {
        assert!(self.chunked, "not a chunked response");
        let mut line = String::new();
        self.reader.read_line(&mut line).ok()?;
        let n = usize::from_str_radix(line.trim(), 16).ok()?;
        let mut data = vec![0; n + 2];
        self.reader.read_exact(&mut data).ok()?;
        data.truncate(n);
        (n > 0).then_some(data)
    }

    /// Reads the rest of the body.
    pub fn finish(mut self) -> Resp {
        let mut body = Vec::new();
        if self.chunked {
            while let Some(c) = self.next_chunk() {
                body.extend(c);
            }
        } else {
            let len = self
                .header("Content-Length")
                .map(|v| v.parse::<usize>().unwrap());
            match len {
                Some(n) => {
                    body.resize(n, 0);
                    self.reader.read_exact(&mut body).unwrap();
                }
                None => {
                    self.reader.read_to_end(&mut body).unwrap();
                }
            }
        }
        Resp {
            status: self.status,
            headers: self.headers,
            body,
        }
    }
}

/// Sends a request and reads the status line and headers.
pub fn open(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Stream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (a 413 for a body too large) and close before it has taken the
    // whole body, and then the write fails; the answer is still there to read, as a real
    // client would.
    if let Err(e) = s.write_all(body) {
        use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
        assert!(
            matches!(e.kind(), BrokenPipe | ConnectionReset),
            "writing the body: {e}"
        );
    }
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("bad status line {line:?}"))
        .parse()
        .unwrap();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        let l = l.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("Transfer-Encoding") && v.contains("chunked"));
    Stream {
        reader,
        status,
        headers,
        chunked,
    }
}

/// Sends a request and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    open(addr, method, path, headers, body).finish()
}

/// POST /chat_stream with a JSON body and an optional cookie.
pub fn chat(addr: SocketAddr, cookie: Option<&str>, body: &Value) -> Resp {
    let headers: Vec<(&str, &str)> = cookie.map(|c| ("Cookie", c)).into_iter().collect();
    request(
        addr,
        "POST",
        "/chat_stream",
        &headers,
        body.to_string().as_bytes(),
    )
}

/// POST /v1/chat/completions with a JSON body and extra headers.
pub fn completions(addr: SocketAddr, headers: &[(&str, &str)], body: &Value) -> Resp {
    let body = body.to_string();
    request(
        addr,
        "POST",
        "/v1/chat/completions",
        headers,
        body.as_bytes(),
    )
}

/// The last `<::EOS::>`-terminated chunk of a ChatStream body: the whole answer.
pub fn final_answer(body: &str) -> String {
    body.trim_end_matches("<::EOS::>")
        .rsplit("<::EOS::>")
        .next()
        .unwrap_or("")
        .to_string()
}

/// `ChatStream` served on 127.0.0.1:0 by a loop that passes a recording callback.
pub struct TestServer {
    pub addr: SocketAddr,
    pub cs: Arc<ChatStream>,
    pub outcomes: Arc<Mutex<Vec<FinishOutcome>>>,
    pub guard: Guard,
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    _dir: SocketDir,
}

impl TestServer {
    /// Serves behind the connection guard with its default limits.
    pub fn start(cfg: ServerConfig, model: Arc<dyn ChatModel>) -> TestServer {
        TestServer::with_limits(cfg, model, ConnLimits::default())
    }

    pub fn with_limits(
        cfg: ServerConfig,
        model: Arc<dyn ChatModel>,
        limits: ConnLimits,
    ) -> TestServer {
        let cs = ChatStream::new(cfg, model);
        let dir = SocketDir::new().unwrap();
        let unix = std::os::unix::net::UnixListener::bind(dir.socket()).unwrap();
        let server = Arc::new(tiny_http::Server::from_listener(unix, None).unwrap());
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let guard = Guard::start(tcp, dir.socket(), limits).unwrap();
        let addr = guard.addr;
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (s, c, o) = (Arc::clone(&server), Arc::clone(&cs), Arc::clone(&outcomes));
        let thread = std::thread::spawn(move || {
            for req in s.incoming_requests() {
                if req.url() == "/chat_stream" && *req.method() == tiny_http::Method::Post {
                    let o = Arc::clone(&o);
                    c.handle_chat_stream_request(
                        req,
                        None,
                        Some(Box::new(move |x| o.lock().unwrap().push(x))),
                    );
                } else {
                    c.handle(req);
                }
            }
        });
        TestServer {
            addr,
            cs,
            outcomes,
            guard,
            server,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Waits until nothing is processing or waiting (panics after 20 s).
    pub fn wait_idle(&self) {
        let start = Instant::now();
        loop {
            let l = self.cs.pool.load();
            if l.processing == 0 && l.waiting == 0 {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server still busy: {l:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn outcomes(&self) -> Vec<FinishOutcome> {
        self.outcomes.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.guard.stop();
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
