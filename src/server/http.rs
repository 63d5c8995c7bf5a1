//! HTTP plumbing over tiny_http: JSON responses, error bodies, cookies, bounded body
//! reading, and `ChunkedStream`, which writes a response head and chunks straight to the
//! socket and flushes each one (tiny_http's `respond` buffers and hides broken pipes).

use std::io::{Read, Write};

use tiny_http::{Header, Request};

/// A header from name and value (both ASCII, so this cannot fail for our own headers).
pub fn header(name: &str, value: &str) -> Header {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("ASCII header")
}

/// The value of header `name`, if present.
pub fn header_value(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .find(|h| h.field.as_str().as_str().eq_ignore_ascii_case(name))
        .map(|h| h.value.as_str().to_string())
}

/// The value of cookie `name`, if the request carries it.
pub fn cookie(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .iter()
        .filter(|h| h.field.equiv("Cookie"))
        .flat_map(|h| h.value.as_str().split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Why a body could not be read.
pub enum BodyError {
    /// Longer than the limit.
    TooLarge,
    /// The connection failed.
    Io,
}

/// Reads the request body, at most `limit` bytes.
pub fn read_body(req: &mut Request, limit: usize) -> Result<Vec<u8>, BodyError> {
    if req.body_length().is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    req.as_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut body)
        .map_err(|_| BodyError::Io)?;
    if body.len() > limit {
        return Err(BodyError::TooLarge);
    }
    Ok(body)
}

/// A streamed (chunked) response written directly to the client's socket.
pub struct ChunkedStream {
    w: Box<dyn Write + Send>,
}

impl ChunkedStream {
    /// Writes the status line and headers; the body follows in chunks.
    pub fn start(
        req: Request,
        status: u16,
        headers: &[(&str, String)],
    ) -> std::io::Result<ChunkedStream> {
        let mut w = req.into_writer();
        let reason = match status {
            200 => "OK",
            _ => "Status",
        };
        let mut head = format!("HTTP/1.1 {status} {reason}\r\nTransfer-Encoding: chunked\r\nCache-Control: no-cache\r\nX-Accel-Buffering: no\r\nX-ChatStream-Node: {}\r\n", super::node());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        w.write_all(head.as_bytes())?;
        w.flush()?;
        Ok(ChunkedStream { w })
    }

    /// Writes one chunk and flushes it; an error means the client has gone.
    pub fn chunk(&mut self, data: &[u8]) -> std::io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        write!(self.w, "{:x}\r\n", data.len())?;
        self.w.write_all(data)?;
        self.w.write_all(b"\r\n")?;
        self.w.flush()
    }

    /// Ends the body.
    pub fn finish(self) -> std::io::Result<()> {
        self.finish_with(b"")
    }

    /// Writes a last chunk and the end of the body in one write, so that a client that stops
    /// reading at the last chunk has already been sent the end.
    pub fn finish_with(mut self, last: &[u8]) -> std::io::Result<()> {
        let mut out = Vec::with_capacity(last.len() + 16);
        if !last.is_empty() {
            out.extend_from_slice(format!("{:x}\r\n", last.len()).as_bytes());
            out.extend_from_slice(last);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        self.w.write_all(&out)?;
        self.w.flush()
    }
}

/// Percent-encodes everything but unreserved characters, as Python's `urllib.parse.quote`
/// with `safe=""`.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
