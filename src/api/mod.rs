//! The control socket: HTTP/1.1 + JSON over a Unix socket.
//!
//! The server (`server.rs`, HTTP/1.1 parsed with httparse) turns each request into an
//! [`ApiAction`], hands it to the VMM's event loop as an [`ApiRequest`] over an
//! mpsc channel, wakes the loop through an eventfd, and answers with whatever
//! the VMM replies. The VMM never sees HTTP; the server never sees VMM state.
//!
//! On the VMM side, when the eventfd fires: read it (to reset the counter),
//! then `try_recv` until the channel is empty — several requests may be
//! queued behind one wakeup — and answer each with [`ApiRequest::respond`].
//!
//! Routes (all bodies are JSON; errors are `{"error": "..."}`):
//!
//! | method | path           | action     | success                      |
//! |--------|----------------|------------|------------------------------|
//! | GET    | `/vm`          | `GetVm`    | 200 with the VMM's JSON      |
//! | PUT    | `/vm/pause`    | `Pause`    | 200 `{"state": "Paused"}` |
//! | PUT    | `/vm/resume`   | `Resume`   | 200 `{"state": "Running"}` |
//! | PUT    | `/vm/shutdown` | `Shutdown` | 200 `{"state": "ShuttingDown"}` |
//! | PUT    | `/snapshot/create` | `SnapshotCreate` (`{"dir": "..."}`) | 200 with what was written |
//! | PUT    | `/migration/send` | `MigrationSend` (`{"destination": "host:port", ...}`) | 200 with the status |
//! | GET    | `/migration` | `MigrationStatus` | 200 with progress |
//! | PUT    | `/migration/cancel` | `MigrationCancel` | 200 with the final status |
//!
//! To add an endpoint: add a variant to [`ApiAction`] and a line to the route
//! table in `server.rs`.

pub mod client;
mod server;

use std::sync::mpsc::Sender;

pub use client::{request, request_with_timeout, ClientError};
pub use server::{
    start_api_server, start_api_server_with_timeout, ApiServer, ApiServerError, MAX_BODY_LEN,
    REPLY_TIMEOUT,
};

/// What a client asked the VMM to do.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiAction {
    /// Describe the VM (state, config, ...): the reply value is sent as is.
    GetVm,
    Pause,
    Resume,
    Shutdown,
    /// Pause (if running), write a snapshot into `dir`, stay paused.
    SnapshotCreate {
        dir: std::path::PathBuf,
    },
    /// Start migrating the guest to another ferry.
    MigrationSend(crate::migration::SendRequest),
    /// Progress of the current (or last) migration.
    MigrationStatus,
    /// Stop the migration in progress; the guest stays here.
    MigrationCancel,
}

/// One action on its way to the VMM, with the channel to answer on.
#[derive(Debug)]
pub struct ApiRequest {
    pub action: ApiAction,
    pub reply: Sender<ApiReply>,
}

impl ApiRequest {
    /// Answers the client. `Ok(Value::Null)` becomes 204 No Content, any other
    /// value 200 with that JSON; `Err` becomes its status with `{"error": ...}`.
    /// A client that gave up meanwhile is not an error.
    pub fn respond(self, reply: ApiReply) {
        let _ = self.reply.send(reply);
    }
}

pub type ApiReply = Result<serde_json::Value, ApiError>;

/// An error answer: an HTTP status (4xx/5xx; anything else is sent as 500)
/// and a one-line message, sent as `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (HTTP {status})")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(400, message)
    }

    /// 409: valid, but not in the VM's current state (e.g. pausing a paused VM).
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(409, message)
    }

    /// 500: the VMM tried and failed.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(500, message)
    }

    /// The JSON body sent to the client.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "error": self.message })
    }
}
