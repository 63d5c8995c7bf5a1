//! The load generator behind `chatstream bench --url`: N concurrent streaming chats against
//! a running server (each a fresh session), for N = 1, 2, 4, 8 by default, reporting what a
//! user compares with TGI/vLLM/llama.cpp's own benchmarks: aggregate and per-stream decode
//! tokens/s, time to first token p50/p99, and mean queue wait (from the server's /metrics).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The server.
    pub addr: SocketAddr,
    /// The user message of every chat.
    pub prompt: String,
    /// Answer length, set on each session first.
    pub max_new_tokens: usize,
    /// Chats per stream at each concurrency.
    pub rounds: usize,
}

/// One finished chat, seen from the client.
struct Sample {
    ttft: f64,
    pieces: usize,
    stream_s: f64,
}

/// Resolves `host:port` (an `http://` prefix is allowed).
pub fn resolve(url: &str) -> Result<SocketAddr, String> {
    let hostport = url.trim_start_matches("http://").trim_end_matches('/');
    hostport
        .to_socket_addrs()
        .map_err(|e| format!("{url}: {e}"))?
        .next()
        .ok_or(format!("{url}: no address"))
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &str,
) -> std::io::Result<BufReader<TcpStream>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}", body.len())?;
    Ok(BufReader::new(s))
}

/// Reads the head; returns (status, Set-Cookie sid, chunked).
fn head(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, Option<String>, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (mut cookie, mut chunked) = (None, false);
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            return Ok((status, cookie, chunked));
        }
        let lower = l.to_ascii_lowercase();
        if lower.starts_with("set-cookie:") {
            cookie = l[11..].trim().split(';').next().map(str::to_string);
        }
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
    }
}

fn one_chat(spec: &LoadSpec) -> Result<Sample, String> {
    let io = |e: std::io::Error| e.to_string();
    // a fresh session with the answer length wanted
    let mut r = send(
        spec.addr,
        "POST",
        "/set_generation_params",
        "",
        &json!({"max_new_tokens": spec.max_new_tokens}).to_string(),
    )
    .map_err(io)?;
    let (_, cookie, _) = head(&mut r).map_err(io)?;
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    let body = json!({"user_input": spec.prompt, "stream": "delta"}).to_string();
    let t0 = Instant::now();
    let mut r = send(spec.addr, "POST", "/chat_stream", &cookie, &body).map_err(io)?;
    let (status, _, chunked) = head(&mut r).map_err(io)?;
    if status != 200 || !chunked {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        return Err(format!("status {status}: {}", rest.trim()));
    }
    let (mut first, mut pieces) = (None, 0usize);
    loop {
        let mut size = String::new();
        r.read_line(&mut size).map_err(io)?;
        let n = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| format!("bad chunk size {size:?}"))?;
        let mut data = vec![0; n + 2];
        r.read_exact(&mut data).map_err(io)?;
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        pieces += 1;
    }
    let ttft = first.ok_or("empty answer")?;
    Ok(Sample {
        ttft,
        pieces,
        stream_s: t0.elapsed().as_secs_f64() - ttft,
    })
}

/// A counter or histogram sum from the server's /metrics (0 when not readable).
fn metric(addr: SocketAddr, name: &str) -> f64 {
    let Ok(mut r) = send(addr, "GET", "/metrics", "", "") else {
        return 0.0;
    };
    let mut text = String::new();
    let _ = r.read_to_string(&mut text);
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `rounds` chats on each of `n` concurrent streams; one JSON object of results.
pub fn run_level(spec: &LoadSpec, n: usize) -> Value {
    let tokens0 = metric(spec.addr, "chatstream_generated_tokens_total");
    let (wait0, waits0) = (
        metric(spec.addr, "chatstream_queue_wait_seconds_sum"),
        metric(spec.addr, "chatstream_queue_wait_seconds_count"),
    );
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let spec = spec.clone();
            std::thread::spawn(move || {
                (0..spec.rounds)
                    .map(|_| one_chat(&spec))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<Result<Sample, String>> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap_or_default())
        .collect();
    let wall = start.elapsed().as_secs_f64();
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let ok: Vec<&Sample> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft).collect();
    ttft.sort_by(f64::total_cmp);
    let tokens = metric(spec.addr, "chatstream_generated_tokens_total") - tokens0;
    let pieces: usize = ok.iter().map(|s| s.pieces).sum();
    let per_stream: Vec<f64> = ok
        .iter()
        .filter(|s| s.stream_s > 0.0)
        .map(|s| s.pieces.saturating_sub(1) as f64 / s.stream_s)
        .collect();
    let waits = metric(spec.addr, "chatstream_queue_wait_seconds_count") - waits0;
    json!({
        "concurrency": n,
        "chats": ok.len(),
        "errors": errors.len(),
        "first_error": errors.first(),
        "aggregate_tokens_per_s": if tokens > 0.0 { tokens } else { pieces as f64 } / wall,
        "per_stream_pieces_per_s": if per_stream.is_empty() { 0.0 } else { per_stream.iter().sum::<f64>() / per_stream.len() as f64 },
        "ttft_p50_s": ttft.first().map(|_| percentile(&ttft, 0.5)),
        "ttft_p99_s": ttft.first().map(|_| percentile(&ttft, 0.99)),
        "queue_wait_mean_s": (waits > 0.0).then(|| (metric(spec.addr, "chatstream_queue_wait_seconds_sum") - wait0) / waits),
    })
}
