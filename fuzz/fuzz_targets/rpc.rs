//! Lines an SDK writes to `matchlock rpc` (JSON-RPC 2.0, newline-delimited), through the
//! server's own line reader (`matchlock_rpc::wire::read_line`: line splitting, the over-long-line
//! path, request/notification parsing) and, for `create`, the conversion of its parameters into a
//! checked sandbox request (`matchlock_api::wire::CreateParams::into_request`, exactly as the
//! server does it before anything is started).
//!
//! The input is the whole stdin of the server; it is read through a tiny buffer so that lines
//! span many refills. The reply the server would write for each request (an error carrying its
//! id) must serialize as exactly one line.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_api::wire::CreateParams;
use matchlock_rpc::wire::{self, read_line, Line, RpcError};
use serde_json::Value;
use std::sync::OnceLock;

/// Lines read per input.
const MAX_LINES: usize = 128;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

fn one_line(v: &Value) {
    let line = serde_json::to_vec(v).expect("a reply serializes");
    assert!(!line.contains(&b'\n'), "a reply spans lines");
}

/// What the server does with `create`'s parameters before touching any image or VM.
fn create(params: Value) -> Result<(), RpcError> {
    let params = if params.is_null() {
        Value::Object(Default::default())
    } else {
        params
    };
    let params: CreateParams = serde_json::from_value(params)
        .map_err(|e| RpcError::params(format!("invalid create params: {e}")))?;
    params
        .into_request()
        .map(drop)
        .map_err(|e| RpcError::params(e.0))
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(async {
        let mut input = tokio::io::BufReader::with_capacity(16, data);
        for _ in 0..MAX_LINES {
            match read_line(&mut input).await {
                Ok(Some(Line::Request(req))) => {
                    let result = match req.method.as_str() {
                        "create" => create(req.params),
                        _ => Ok(()),
                    };
                    if let Some(id) = &req.id {
                        match result {
                            Ok(()) => one_line(&wire::response(id, Value::Null)),
                            Err(e) => one_line(&wire::error(Some(id), &e)),
                        }
                    }
                }
                Ok(Some(Line::TooLong { id, .. })) => {
                    one_line(&wire::error(id.as_ref(), &RpcError::params("too long")))
                }
                Ok(Some(Line::Invalid)) => {}
                Ok(None) | Err(_) => break,
            }
        }
    });
});
