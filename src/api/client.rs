//! A minimal client for the control socket, used by `ferry ctl` and tests:
//! one HTTP/1.1 request per connection (`Connection: close`), the response
//! read to the end and parsed with httparse.

use crate::util::io_msg;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Default time to wait for the server; longer than the server's own wait
/// for the VMM, so that its 504 arrives rather than a client timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Responses larger than this are refused rather than buffered.
const MAX_RESPONSE_LEN: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot connect to {}: {} (is ferry running with --api-sock {}?)",
        path.display(),
        io_msg(source),
        path.display()
    )]
    Connect { path: PathBuf, source: io::Error },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error("{}: cannot send the request: {}", path.display(), io_msg(source))]
    Send { path: PathBuf, source: io::Error },
    #[error("{}: cannot read the response: {}", path.display(), io_msg(source))]
    Receive { path: PathBuf, source: io::Error },
    #[error("{}: bad response: {reason}", path.display())]
    BadResponse { path: PathBuf, reason: String },
    #[error("{method} {request} failed ({status}): {message}")]
    Status {
        method: String,
        request: String,
        status: u16,
        message: String,
    },
}

/// Sends one request and returns the status and the JSON body (`Null` when
/// the body is empty). Error statuses are returned, not turned into
/// `ClientError`: their body is `{"error": "..."}` (see [`error_message`]).
pub fn request(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), ClientError> {
    request_with_timeout(sock, method, path, body, DEFAULT_TIMEOUT)
}

/// [`request`] with a chosen timeout for each read and write.
pub fn request_with_timeout(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> Result<(u16, Value), ClientError> {
    let raw = encode_request(method, path, body)?;
    let mut stream = UnixStream::connect(sock).map_err(|source| ClientError::Connect {
        path: sock.to_path_buf(),
        source,
    })?;
    let receive_error = |source| ClientError::Receive {
        path: sock.to_path_buf(),
        source,
    };
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(receive_error)?;
    stream
        .write_all(&raw)
        .and_then(|()| stream.flush())
        .map_err(|source| ClientError::Send {
            path: sock.to_path_buf(),
            source,
        })?;

    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE_LEN + 1)
        .read_to_end(&mut response)
        .map_err(receive_error)?;
    if response.len() as u64 > MAX_RESPONSE_LEN {
        return Err(ClientError::BadResponse {
            path: sock.to_path_buf(),
            reason: format!("larger than {MAX_RESPONSE_LEN} bytes"),
        });
    }
    parse_response(&response, method == "HEAD").map_err(|reason| ClientError::BadResponse {
        path: sock.to_path_buf(),
        reason,
    })
}

/// [`request`] for a typed answer: an error status becomes
/// [`ClientError::Status`], a body that is not a `T` a
/// [`ClientError::BadResponse`].
pub fn request_typed<T: serde::de::DeserializeOwned>(
    sock: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<T, ClientError> {
    let (status, value) = request(sock, method, path, body)?;
    if !(200..300).contains(&status) {
        return Err(ClientError::Status {
            method: method.to_string(),
            request: path.to_string(),
            status,
            message: error_message(&value)
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string()),
        });
    }
    serde_json::from_value(value).map_err(|e| ClientError::BadResponse {
        path: sock.to_path_buf(),
        reason: format!("unexpected body for {method} {path}: {e}"),
    })
}

/// The `"error"` message of an error response body, if it has one.
pub fn error_message(body: &Value) -> Option<&str> {
    body.get("error").and_then(Value::as_str)
}

fn encode_request(method: &str, path: &str, body: Option<&Value>) -> Result<Vec<u8>, ClientError> {
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ClientError::InvalidRequest(format!(
            "method {method:?} is not an HTTP method"
        )));
    }
    if !path.starts_with('/') || !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ClientError::InvalidRequest(format!(
            "path {path:?} must start with / and contain no spaces or control characters"
        )));
    }
    let body = match body {
        Some(value) => serde_json::to_vec(value).map_err(|e| {
            ClientError::InvalidRequest(format!("cannot encode the body as JSON: {e}"))
        })?,
        None => Vec::new(),
    };
    let mut raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Connection: close\r\n"
    );
    if !body.is_empty() {
        raw.push_str("Content-Type: application/json\r\n");
    }
    if !body.is_empty() || !matches!(method, "GET" | "HEAD") {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(&body);
    Ok(raw)
}

/// Parses a complete response (the server closed the connection after it).
fn parse_response(mut data: &[u8], head_request: bool) -> Result<(u16, Value), String> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let header_len = match response.parse(data) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if data.is_empty() => {
                return Err("the server closed the connection without answering".into())
            }
            Ok(httparse::Status::Partial) => return Err("truncated header".into()),
            Err(e) => return Err(format!("malformed header: {e}")),
        };
        let status = response.code.ok_or("no status code")?;
        let rest = &data[header_len..];
        // Interim responses (100 Continue) precede the real one.
        if (100..200).contains(&status) && status != 101 {
            data = rest;
            continue;
        }

        let header = |name: &str| {
            response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
        };
        let body: Vec<u8> = if head_request || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(encoding) = header("Transfer-Encoding") {
            if !encoding.eq_ignore_ascii_case("chunked") {
                return Err(format!("unsupported Transfer-Encoding {encoding:?}"));
            }
            decode_chunked(rest)?
        } else if let Some(length) = header("Content-Length") {
            let length: usize = length
                .parse()
                .map_err(|_| format!("bad Content-Length {length:?}"))?;
            match rest.get(..length) {
                Some(body) => body.to_vec(),
                None => return Err(format!("truncated body: {} of {length} bytes", rest.len())),
            }
        } else {
            rest.to_vec()
        };

        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok((status, Value::Null));
        }
        let value = serde_json::from_slice(&body).map_err(|e| format!("body is not JSON: {e}"))?;
        return Ok((status, value));
    }
}

fn decode_chunked(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let (start, size) = match httparse::parse_chunk_size(data) {
            Ok(httparse::Status::Complete(parsed)) => parsed,
            Ok(httparse::Status::Partial) => return Err("truncated chunked body".into()),
            Err(_) => return Err("malformed chunk size".into()),
        };
        if size == 0 {
            return Ok(body);
        }
        let chunk = usize::try_from(size)
            .ok()
            .and_then(|size| data.get(start..)?.get(..size))
            .ok_or("truncated chunked body")?;
        body.extend_from_slice(chunk);
        data = data
            .get(start + chunk.len()..)
            .and_then(|rest| rest.strip_prefix(b"\r\n"))
            .ok_or("malformed chunked body")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_socket_gives_a_clear_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("none.sock");
        let err = request(&sock, "GET", "/vm", None).expect_err("no socket");
        assert!(matches!(err, ClientError::Connect { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "cannot connect to {0}: No such file or directory (is ferry running with \
                 --api-sock {0}?)",
                sock.display()
            )
        );
    }

    #[test]
    fn dead_socket_gives_connection_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
        let err = request(&sock, "GET", "/vm", None).expect_err("nobody listens");
        assert!(
            err.to_string().starts_with(&format!(
                "cannot connect to {}: Connection refused",
                sock.display()
            )),
            "{err}"
        );
    }

    #[test]
    fn invalid_method_or_path_is_refused_before_connecting() {
        let sock = Path::new("/nonexistent.sock");
        for (method, path) in [
            ("get", "/vm"),
            ("GET", "vm"),
            ("GET", "/vm\r\nX: y"),
            ("", "/"),
        ] {
            assert!(matches!(
                request(sock, method, path, None),
                Err(ClientError::InvalidRequest(_))
            ));
        }
    }

    #[test]
    fn request_encoding() {
        let raw = encode_request("GET", "/vm", None).expect("encode");
        assert_eq!(
            String::from_utf8(raw).expect("utf8"),
            "GET /vm HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Connection: close\r\n\r\n"
        );
        let raw = encode_request("PUT", "/vm/pause", None).expect("encode");
        assert!(String::from_utf8(raw)
            .expect("utf8")
            .ends_with("Content-Length: 0\r\n\r\n"));
        let raw = encode_request("PUT", "/x", Some(&serde_json::json!({"a": 1}))).expect("encode");
        assert!(String::from_utf8(raw)
            .expect("utf8")
            .ends_with("Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"));
    }

    #[test]
    fn response_parsing() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{\"a\": true}";
        assert_eq!(
            parse_response(ok, false),
            Ok((200, serde_json::json!({"a": true})))
        );
        let no_content = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(parse_response(no_content, false), Ok((204, Value::Null)));
        let to_eof = b"HTTP/1.1 404 Not Found\r\n\r\n{\"error\": \"x\"}";
        let (status, body) = parse_response(to_eof, false).expect("parse");
        assert_eq!((status, error_message(&body)), (404, Some("x")));
        let interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1";
        assert_eq!(
            parse_response(interim, false),
            Ok((200, serde_json::json!(1)))
        );
        let chunked =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(
            parse_response(chunked, false),
            Ok((200, serde_json::json!([1, 2])))
        );

        assert!(parse_response(b"", false)
            .expect_err("empty")
            .contains("without answering"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Le", false)
            .expect_err("partial")
            .contains("truncated header"));
        assert!(parse_response(b"garbage\r\n\r\n", false)
            .expect_err("garbage")
            .contains("malformed header"));
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n{}", false)
                .expect_err("short")
                .contains("truncated body: 2 of 10 bytes")
        );
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nnot json", false)
            .expect_err("not json")
            .contains("body is not JSON"));
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false)
                .expect_err("bad length")
                .contains("bad Content-Length")
        );
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
            false
        )
        .expect_err("bad chunk")
        .contains("truncated chunked body"));
    }
}
