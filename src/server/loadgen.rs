//! The load generator behind `chatstream bench --url`: N concurrent streamed chat completions
//! (the OpenAI endpoint, as vLLM's and TGI's own benchmarks use) against a running server,
//! for N = 1, 2, 4, 8 by default, reporting what a user compares with them: aggregate
//! tokens/s end to end, aggregate and per-stream decode tokens/s, time to first token
//! p50/p99, and mean queue wait (from the server's /metrics, when its roles let a program
//! read it). Also the time to first token of a conversation's second turn, its first turn
//! cached, against the same prompt sent cold (`second_turn`).

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
    /// Answer length (`max_tokens` of each request).
    pub max_new_tokens: usize,
    /// Chats per stream at each concurrency.
    pub rounds: usize,
    /// The server's `--api-key`, when it has one.
    pub api_key: Option<String>,
}

/// One finished chat, seen from the client.
struct Sample {
    ttft: f64,
    pieces: usize,
    tokens: usize,
    /// When its first and last pieces came, in seconds since the level started.
    decoding: (f64, f64),
    /// The answer.
    text: String,
    /// The usage's prompt tokens and, of those, the ones the server had cached.
    prompt_tokens: usize,
    cached_tokens: usize,
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

/// Reads the head; returns (status, chunked).
fn head(r: &mut BufReader<TcpStream>) -> std::io::Result<(u16, bool)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            return Ok((status, chunked));
        }
        let lower = l.to_ascii_lowercase();
        chunked |= lower.starts_with("transfer-encoding:") && lower.contains("chunked");
    }
}

/// A streamed chat completion's body: `messages` as (role, text) pairs, the answer at most
/// `max_tokens` long, kept in cache under `cache_key` when there is one.
fn chat_body(messages: &[(&str, &str)], max_tokens: usize, cache_key: Option<&str>) -> String {
    let messages: Vec<Value> = messages
        .iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    let mut body = json!({
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(k) = cache_key {
        body["prompt_cache_key"] = json!(k);
    }
    body.to_string()
}

/// One streamed chat completion (`/v1/chat/completions`, which every server answers
/// whatever its roles), timed from the request to the first and the last piece of text.
fn one_chat(spec: &LoadSpec, body: &str, level_start: Instant) -> Result<Sample, String> {
    let io = |e: std::io::Error| e.to_string();
    let auth = spec
        .api_key
        .as_ref()
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let t0 = Instant::now();
    let mut r = send(spec.addr, "POST", "/v1/chat/completions", &auth, body).map_err(io)?;
    let (status, chunked) = head(&mut r).map_err(io)?;
    if status != 200 || !chunked {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        return Err(format!("status {status}: {}", rest.trim()));
    }
    let (mut first, mut pieces, mut tokens) = (None, 0usize, None);
    let (mut text, mut prompt_tokens, mut cached_tokens) = (String::new(), 0, 0);
    let mut events = String::new();
    'body: loop {
        let mut size = String::new();
        r.read_line(&mut size).map_err(io)?;
        let n = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| format!("bad chunk size {size:?}"))?;
        let mut data = vec![0; n + 2];
        r.read_exact(&mut data).map_err(io)?;
        if n == 0 {
            break;
        }
        events.push_str(&String::from_utf8_lossy(&data[..n]));
        // whole events only: a chunk may end inside one
        while let Some(end) = events.find("\n\n") {
            let event: String = events.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue; // a queue-position comment
            };
            if data == "[DONE]" {
                break 'body;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| e.to_string())?;
            if let Some(e) = v.get("error") {
                return Err(e.to_string());
            }
            if let Some(c) = v["choices"][0]["delta"]["content"]
                .as_str()
                .filter(|c| !c.is_empty())
            {
                first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
                pieces += 1;
                text.push_str(c);
            }
            let usage = &v["usage"];
            if let Some(t) = usage["completion_tokens"].as_u64() {
                tokens = Some(t as usize);
                prompt_tokens = usage["prompt_tokens"].as_u64().unwrap_or(0) as usize;
                cached_tokens = usage["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0) as usize;
            }
        }
    }
    let ttft = first.ok_or("empty answer")?;
    let since_start = (t0 - level_start).as_secs_f64();
    let total = t0.elapsed().as_secs_f64();
    Ok(Sample {
        ttft,
        pieces,
        tokens: tokens.unwrap_or(pieces),
        decoding: (since_start + ttft, since_start + total),
        text,
        prompt_tokens,
        cached_tokens,
    })
}

/// A counter or histogram sum from the server's /metrics (`None` when its roles deny it).
fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let mut r = send(addr, "GET", "/metrics", "", "").ok()?;
    if head(&mut r).ok()?.0 != 200 {
        return None;
    }
    let mut text = String::new();
    let _ = r.read_to_string(&mut text);
    Some(
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum(),
    )
}

/// How long at least one of the intervals was open (their union's length): the time in
/// which some stream was decoding.
fn covered_seconds(mut spans: Vec<(f64, f64)>) -> f64 {
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut total = 0.0;
    let mut open: Option<(f64, f64)> = None;
    for (s, e) in spans {
        match open {
            Some((os, oe)) if s <= oe => open = Some((os, oe.max(e))),
            _ => {
                total += open.map_or(0.0, |(os, oe)| oe - os);
                open = Some((s, e));
            }
        }
    }
    total + open.map_or(0.0, |(s, e)| e - s)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `rounds` chats on each of `n` concurrent streams; one JSON object of results.
/// Queue wait comes from the server's /metrics, when its roles let a program read it.
pub fn run_level(spec: &LoadSpec, n: usize) -> Value {
    let waits = || {
        Some((
            metric(spec.addr, "chatstream_queue_wait_seconds_sum")?,
            metric(spec.addr, "chatstream_queue_wait_seconds_count")?,
        ))
    };
    let before = waits();
    let start = Instant::now();
    let body = chat_body(&[("user", &spec.prompt)], spec.max_new_tokens, None);
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (spec, body) = (spec.clone(), body.clone());
            std::thread::spawn(move || {
                (0..spec.rounds)
                    .map(|_| one_chat(&spec, &body, start))
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
    let tokens: usize = ok.iter().map(|s| s.tokens).sum();
    // Decode throughput counts the tokens after each chat's first over the time in which some
    // chat was decoding: prefill that runs while nothing decodes is time to first token.
    let decode_tokens: usize = ok.iter().map(|s| s.tokens.saturating_sub(1)).sum();
    let decoding = covered_seconds(ok.iter().map(|s| s.decoding).collect());
    let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
    let per_stream: Vec<f64> = ok
        .iter()
        .map(|s| (s.pieces, s.decoding.1 - s.decoding.0))
        .filter(|&(_, secs)| secs > 0.0)
        .map(|(pieces, secs)| pieces.saturating_sub(1) as f64 / secs)
        .collect();
    let queue_wait = match (before, waits()) {
        (Some((s0, n0)), Some((s1, n1))) if n1 > n0 => Some((s1 - s0) / (n1 - n0)),
        _ => None,
    };
    json!({
        "concurrency": n,
        "chats": ok.len(),
        "errors": errors.len(),
        "first_error": errors.first(),
        "tokens": tokens,
        "aggregate_tokens_per_s": tokens as f64 / wall,
        "aggregate_decode_tokens_per_s": rate(decode_tokens as f64, decoding),
        "per_stream_pieces_per_s": rate(per_stream.iter().sum(), per_stream.len() as f64),
        "ttft_p50_s": ttft.first().map(|_| percentile(&ttft, 0.5)),
        "ttft_p99_s": ttft.first().map(|_| percentile(&ttft, 0.99)),
        "queue_wait_mean_s": queue_wait,
    })
}

/// Time to first token of a conversation's second turn, its first turn (a user message of
/// about `history_tokens` tokens and the answer) cached under a `prompt_cache_key`, against
/// the same prompt sent cold: its system message starts with another tag, so that no cache
/// holds more than the chat template's first tokens. `spec.rounds` conversations, each its
/// warm and its cold second turn in turn; medians.
pub fn second_turn(spec: &LoadSpec, history_tokens: usize) -> Value {
    // about 18 tokens a note (SmolLM2's tokenizer)
    let history: String = (0..history_tokens.div_ceil(18).max(1))
        .map(|i| format!("Note {i}: the keeper climbs the stairs at dusk and lights the lamp. "))
        .collect();
    let question = "Which note mentions the lamp first? Answer in one word.";
    let start = Instant::now();
    let mut rounds = Vec::new();
    for r in 0..spec.rounds {
        // the kind first, so that a cold prompt shares as few tokens as can be with others
        let tag = |kind: &str| format!("{kind}{r}-{}", std::process::id());
        let system = |tag: &str| format!("[{tag}] You are a helpful assistant.");
        let (warm, cold) = (tag("warm"), tag("cold"));
        let first = [("system", system(&warm)), ("user", history.clone())];
        let turn = |msgs: &[(&str, String)], max: usize, key: Option<&str>| {
            let msgs: Vec<(&str, &str)> = msgs.iter().map(|(r, c)| (*r, c.as_str())).collect();
            one_chat(spec, &chat_body(&msgs, max, key), start)
        };
        let answer = match turn(&first, spec.max_new_tokens, Some(&warm)) {
            Ok(s) => s.text,
            Err(e) => return json!({"second_turn": {"error": e}}),
        };
        let mut second = first.to_vec();
        second.extend([("assistant", answer), ("user", question.to_string())]);
        // only the first token is timed: short answers
        let hot = turn(&second, 4, Some(&warm));
        second[0].1 = system(&cold);
        let cool = turn(&second, 4, None);
        match (hot, cool) {
            (Ok(h), Ok(c)) => rounds.push((h, c)),
            (Err(e), _) | (_, Err(e)) => return json!({"second_turn": {"error": e}}),
        }
    }
    let median = |f: &dyn Fn(&(Sample, Sample)) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (ttft, cold_ttft) = (median(&|(h, _)| h.ttft), median(&|(_, c)| c.ttft));
    json!({"second_turn": {
        "rounds": rounds.len(),
        "prompt_tokens": median(&|(h, _)| h.prompt_tokens as f64) as u64,
        "cached_tokens": median(&|(h, _)| h.cached_tokens as f64) as u64,
        "cold_cached_tokens": median(&|(_, c)| c.cached_tokens as f64) as u64,
        "ttft_s": ttft,
        "cold_ttft_s": cold_ttft,
        "over_cold": if cold_ttft > 0.0 { ttft / cold_ttft } else { 0.0 },
    }})
}

#[cfg(test)]
mod tests {
    use super::covered_seconds;

    #[test]
    fn decoding_time_is_the_union_of_the_streams() {
        assert_eq!(covered_seconds(vec![]), 0.0);
        assert_eq!(covered_seconds(vec![(1.0, 3.0)]), 2.0);
        // overlapping, nested, touching and apart, in any order
        let spans = vec![(5.0, 6.0), (0.0, 2.0), (1.0, 4.0), (1.5, 1.7), (4.0, 4.5)];
        assert_eq!(covered_seconds(spans), 5.5);
    }
}
