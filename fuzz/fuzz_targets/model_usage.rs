//! What the network plugins read from bytes others choose: an upstream's answer to a model call
//! (`matchlock_policy::plugins::usage::UsageTap`, as an event stream and as JSON), a guest's
//! model-call body (`routes::Router::route`), and the strings of routes, backends and price files
//! (`Route::parse`, `Backend::parse`, `Prices::parse`).
//!
//! Input: byte 0 picks the chunk size the answer is fed in (1 to 256 bytes); the rest is the
//! answer, then the request body, then the strings. Beyond "no panic": token counts the tap
//! reports never exceed what the input could spell, a priced call's cost is finite and not
//! negative, and a routed body parses as JSON and names the route's target model.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_policy::plugins::prices::Prices;
use matchlock_policy::plugins::routes::{Backend, Route, Router};
use matchlock_policy::plugins::usage::{Call, UsageTap};
use std::sync::OnceLock;

fn router() -> &'static Router {
    static R: OnceLock<Router> = OnceLock::new();
    R.get_or_init(|| {
        let routes = ["api.test/gpt-4o=llama3.1:8b", "api.test/claude-x=qwen@127.0.0.1:9"]
            .iter()
            .map(|r| Route::parse(r).expect("a valid route"))
            .collect();
        Router::new(routes, None).expect("a valid router")
    })
}

fn prices() -> &'static Prices {
    static P: OnceLock<Prices> = OnceLock::new();
    P.get_or_init(Prices::shipped)
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(pick) + 1;
    for content_type in ["text/event-stream", "application/json"] {
        let mut tap = UsageTap::new(content_type);
        for piece in rest.chunks(chunk) {
            tap.push(piece);
        }
        if let Some(u) = tap.finish() {
            let call = Call::priced("api.test", Some("gpt-4o"), u, prices(), None, 1);
            assert!(call.cost_usd.is_finite() && call.cost_usd >= 0.0, "{call:?}");
        }
    }
    for path in ["/v1/chat/completions", "/v1/messages"] {
        if let Some(d) = router().route("api.test", path, rest).directive {
            let v: serde_json::Value = serde_json::from_slice(&d.body).expect("a routed body is JSON");
            assert_eq!(v["model"].as_str(), Some(d.target_model.as_str()));
        }
    }
    if let Ok(text) = std::str::from_utf8(rest) {
        let _ = Route::parse(text);
        let _ = Backend::parse(text);
        let _ = Prices::parse(text);
    }
});
