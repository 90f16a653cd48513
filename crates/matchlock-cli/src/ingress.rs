//! `matchlock ingress`: the ingress gateway in the foreground.

use crate::run::{block_on, until_stopped};
use anyhow::{anyhow, Result};
use matchlock_ingress::{Gateway, IngressParams, IngressRoute, Options};
use matchlock_sandbox::{Client, Store};
use std::sync::Arc;

/// Serves the gateway until interrupted, or prints the routes (`--routes`).
pub fn ingress(
    id: &str,
    listen: &str,
    routes: &[String],
    no_websockets: bool,
    show_routes: bool,
) -> Result<i32> {
    let routes = routes
        .iter()
        .map(|r| r.parse::<IngressRoute>().map_err(|e| anyhow!(e)))
        .collect::<Result<Vec<_>>>()?;
    let params = IngressParams {
        listen: listen.to_string(),
        routes: (!routes.is_empty()).then_some(routes),
        allow_websockets: !no_websockets,
        ..IngressParams::default()
    };
    let opts = Options::from_params(&params).map_err(|e| anyhow!(e))?;
    let store = Store::open_default();
    let id = store.resolve_id(id)?;
    let client = Client::for_sandbox(&store, &id)?;
    block_on(async move {
        if show_routes {
            let (routes, problems) = matchlock_ingress::read_routes(&client)
                .await
                .map_err(|e| anyhow!(e))?;
            print_routes(&routes);
            for p in problems {
                eprintln!("warning: {} {p} (skipped)", matchlock_ingress::ROUTES_FILE);
            }
            return Ok(0);
        }
        let mut gw = Gateway::start(Arc::new(client.clone()), opts)
            .await
            .map_err(|e| anyhow!(e))?;
        if let Some(routes) = params.routes {
            gw.set_routes(routes).await.map_err(|e| anyhow!(e))?;
        }
        let (routes, problems) = gw.routes().await.map_err(|e| anyhow!(e))?;
        // On stderr, like port-forward's line (scripts wait for it); the URL alone on stdout.
        eprintln!("Ingress {} -> sandbox {id}", gw.url());
        print_routes_to_stderr(&routes);
        for p in problems {
            eprintln!("warning: {} {p} (skipped)", matchlock_ingress::ROUTES_FILE);
        }
        println!("{}", gw.url());
        until_stopped(&client, &id, gw.wait(), "the ingress listener stopped").await
    })
}

fn describe(r: &IngressRoute) -> String {
    format!(
        "{} -> :{}{}",
        r.prefix,
        r.port,
        if r.strip_prefix {
            " (prefix stripped)"
        } else {
            ""
        }
    )
}

fn print_routes(routes: &[IngressRoute]) {
    for r in routes {
        println!("{}", describe(r));
    }
}

fn print_routes_to_stderr(routes: &[IngressRoute]) {
    if routes.is_empty() {
        eprintln!(
            "  no routes yet: add --route PREFIX=PORT, or write {} in the sandbox",
            matchlock_ingress::ROUTES_FILE
        );
    }
    for r in routes {
        eprintln!("  {}", describe(r));
    }
}
