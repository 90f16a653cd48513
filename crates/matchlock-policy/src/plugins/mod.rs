//! The logic of the network plugins that act on model calls, decided without sockets:
//! `local_model_router` ([`routes`]), `usage_logger` ([`usage`], priced by [`prices`]) and
//! `budget_gate` ([`budget`]). The proxy runs them as stages of its pipeline (gate, route,
//! request transform, response transform).

pub mod budget;
pub mod prices;
pub mod routes;
pub mod usage;

use matchlock_api::plugins::PluginsConfig;
use std::sync::Arc;

/// The plugins of one sandbox, ready to run.
#[derive(Debug, Clone, Default)]
pub struct Plugins {
    /// `local_model_router`.
    pub router: Option<routes::Router>,
    /// `usage_logger`: the log, and the prices for calls whose provider reports no cost.
    pub usage: Option<(Arc<usage::UsageLog>, Arc<prices::Prices>)>,
    /// `budget_gate`.
    pub budget: Option<budget::BudgetGate>,
}

/// Checks `config` as far as can be done without writing anything: routes and backends parse,
/// the price file reads, the usage log's directory exists and the log, if there, is a file
/// that can be appended to.
pub fn check(config: &PluginsConfig) -> Result<(), String> {
    parse(config)?;
    Ok(())
}

/// What `config` makes without writing anything (see [`check`]): the router and the prices.
fn parse(
    config: &PluginsConfig,
) -> Result<(Option<routes::Router>, Option<prices::Prices>), String> {
    config.check()?;
    let router = match &config.local_model_router {
        Some(r) => {
            let backend = r
                .backend
                .as_deref()
                .map(|b| {
                    routes::Backend::parse(b).map_err(|e| format!("--local-model-backend: {e}"))
                })
                .transpose()?;
            let list = r
                .routes
                .iter()
                .map(|s| routes::Route::parse(s).map_err(|e| format!("--local-model-route: {e}")))
                .collect::<Result<Vec<_>, _>>()?;
            Some(routes::Router::new(list, backend)?)
        }
        None => None,
    };
    let Some(u) = &config.usage_logger else {
        return Ok((router, None));
    };
    let prices = match &u.price_file {
        Some(f) => prices::Prices::with_file(f)?,
        None => prices::Prices::shipped(),
    };
    let dir = u
        .path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    if !dir.is_dir() {
        return Err(format!(
            "usage log {}: directory {} does not exist",
            u.path.display(),
            dir.display()
        ));
    }
    match std::fs::metadata(&u.path) {
        Ok(m) if !m.is_file() => {
            return Err(format!(
                "usage log {}: not a regular file",
                u.path.display()
            ))
        }
        Ok(_) => {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&u.path)
                .map_err(|e| format!("usage log {}: {e}", u.path.display()))?;
        }
        Err(_) => {}
    }
    Ok((router, Some(prices)))
}

impl Plugins {
    /// Builds the plugins of `config`, opening (creating) the usage log.
    pub fn from_config(config: &PluginsConfig) -> Result<Plugins, String> {
        let (router, prices) = parse(config)?;
        let usage = match (&config.usage_logger, prices) {
            (Some(u), Some(prices)) => {
                Some((Arc::new(usage::UsageLog::open(&u.path)?), Arc::new(prices)))
            }
            _ => None,
        };
        let budget = match (&config.budget_gate, &usage) {
            (Some(b), Some((log, _))) => Some(budget::BudgetGate::new(b.limit_usd, log.clone())?),
            _ => None,
        };
        Ok(Plugins {
            router,
            usage,
            budget,
        })
    }

    /// Whether none runs.
    pub fn is_empty(&self) -> bool {
        self.router.is_none() && self.usage.is_none() && self.budget.is_none()
    }
}
