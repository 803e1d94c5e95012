//! HTTP responses on the WebSocket port, each with the CORS headers a
//! browser's `fetch` needs, and the connection closed after it.

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Headers a preflight may ask for that we accept, besides whatever it
/// names (echoed back).
const ALLOWED_HEADERS: &str = "authorization, apikey, content-type, x-client-info, x-supabase-api-version";

#[derive(Debug, PartialEq)]
pub struct Response {
    pub status: u16,
    pub body: Option<Value>,
    /// Extra headers (a preflight's).
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    pub fn empty(status: u16) -> Response {
        Response {
            status,
            body: None,
            headers: Vec::new(),
        }
    }

    /// `{"message": message}`, the shape supabase-js reads errors from.
    pub fn message(status: u16, message: &str) -> Response {
        Response::json(status, serde_json::json!({ "message": message }))
    }

    pub fn json(status: u16, body: Value) -> Response {
        Response {
            status,
            body: Some(body),
            headers: Vec::new(),
        }
    }

    /// The answer to a CORS preflight: POST from anywhere, with the
    /// headers it asks for.
    pub fn preflight(requested_headers: Option<&str>) -> Response {
        let allowed = match requested_headers {
            Some(asked) if !asked.is_empty() => format!("{ALLOWED_HEADERS}, {asked}"),
            _ => ALLOWED_HEADERS.to_owned(),
        };
        Response {
            status: 204,
            body: None,
            headers: vec![
                ("access-control-allow-methods", "POST, OPTIONS".into()),
                ("access-control-allow-headers", allowed),
                ("access-control-max-age", "86400".into()),
            ],
        }
    }

    /// The response as bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self.body.as_ref().map(Value::to_string).unwrap_or_default();
        let mut out = format!("HTTP/1.1 {} {}\r\n", self.status, reason(self.status));
        out.push_str("access-control-allow-origin: *\r\nconnection: close\r\n");
        for (name, value) in &self.headers {
            // (values are ours or a client's header value: no line breaks)
            out.push_str(&format!("{name}: {}\r\n", value.replace(['\r', '\n'], " ")));
        }
        if self.body.is_some() {
            out.push_str("content-type: application/json\r\n");
        }
        out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
        out.into_bytes()
    }

    /// Writes the response and ends our side of the connection.
    pub async fn write(&self, stream: &mut TcpStream) -> std::io::Result<()> {
        stream.write_all(&self.to_bytes()).await?;
        stream.shutdown().await
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}
