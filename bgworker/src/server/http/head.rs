//! Reading what a client sends first: an HTTP request's head, bounded in
//! bytes and (by the caller) in time.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The most a request's head (request line and headers) may take.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// A request's head, parsed, with every byte read so far.
#[derive(Debug)]
pub struct Head {
    pub method: String,
    /// The path, percent-encoded as sent, without the query.
    pub path: String,
    pub query: String,
    /// Header names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    /// What was read: the head, and perhaps the start of a body.
    pub raw: Vec<u8>,
    pub head_len: usize,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("the request's head is over {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("the request is not HTTP/1.1")]
    Malformed,
    #[error("the connection closed")]
    Closed,
}

/// Reads until the head is complete.
pub async fn read_head(stream: &mut TcpStream) -> Result<Head, HeadError> {
    let mut raw = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head) = parse(&raw)? {
            return Ok(head);
        }
        if raw.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let n = stream.read(&mut chunk).await.map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        raw.extend_from_slice(&chunk[..n]);
    }
}

/// The head, if `raw` holds all of it.
pub fn parse(raw: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed),
    };
    let target = request.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Some(Head {
        method: request.method.unwrap_or("").to_owned(),
        path: path.to_owned(),
        query: query.to_owned(),
        headers: request
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect(),
        raw: raw.to_vec(),
        head_len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_when_complete() {
        let raw =
            b"POST /realtime/v1/api/broadcast?x=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nAPIKEY: k\r\n\r\n{}";
        assert!(parse(&raw[..20]).unwrap().is_none());
        let head = parse(raw).unwrap().unwrap();
        assert_eq!(
            (head.method.as_str(), head.path.as_str(), head.query.as_str()),
            ("POST", "/realtime/v1/api/broadcast", "x=1")
        );
        assert_eq!(head.header("apikey"), Some("k"));
        assert_eq!(&head.raw[head.head_len..], b"{}");
        assert_eq!(parse(b"\x16\x03\x01junk\r\n\r\n").unwrap_err(), HeadError::Malformed);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(100));
        assert_eq!(parse(many.as_bytes()).unwrap_err(), HeadError::TooLarge);
    }
}
