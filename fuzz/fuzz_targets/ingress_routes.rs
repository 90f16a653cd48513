//! The ingress routes file (`/etc/matchlock/ingress-routes`), which the guest may write and the
//! host's gateway parses (`matchlock_api::ingress::parse_routes_file`), and the route matching
//! it then does on client paths.
//!
//! Checks, beyond not panicking: every route it keeps is valid, no prefix twice, at most
//! `MAX_ROUTES`; the file it would write for them parses back to the same routes; and for a
//! path taken from the input, the chosen route really matches it and is the longest that does.

#![no_main]

use libfuzzer_sys::fuzz_target;
use matchlock_api::ingress::{
    best_route, format_routes_file, parse_routes_file, validate_routes, MAX_ROUTES,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (routes, problems) = parse_routes_file(&text);
    assert!(routes.len() <= MAX_ROUTES);
    assert!(validate_routes(&routes).is_ok(), "{routes:?}");
    let (again, none) = parse_routes_file(&format_routes_file(&routes));
    assert_eq!(again, routes);
    assert!(none.is_empty(), "{none:?}");
    let _ = problems;
    // A client path: the input's last line.
    let path = text.lines().last().unwrap_or("/");
    if let Some(r) = best_route(&routes, path) {
        assert!(r.matches(path));
        let _ = r.backend_path(path);
        let longest = routes
            .iter()
            .filter(|o| o.matches(path))
            .map(|o| o.prefix.trim_end_matches('/').len())
            .max();
        assert_eq!(Some(r.prefix.trim_end_matches('/').len()), longest);
    } else {
        assert!(routes.iter().all(|o| !o.matches(path)));
    }
});
