//! The network plugins a sandbox runs in its interception pipeline, in the shape users write
//! them (`network.plugins[] = {"type", "enabled", "config"}`, over RPC and in a plugins file)
//! and as the typed [`PluginsConfig`] the CLI flags, the RPC and the file all become.
//!
//! | type | phases | config | CLI |
//! |---|---|---|---|
//! | `local_model_router` | route, request | `{"backend": "HOST:PORT", "routes": ["SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL[@HOST:PORT]"]}` | `--local-model-backend`, `--local-model-route` |
//! | `usage_logger` | response | `{"path": "usage.jsonl", "price_file": "prices.json"}` | `--usage-log-path`, `--price-file` |
//! | `budget_gate` | gate | `{"limit_usd": 5.0}` | `--budget-limit-usd` |
//!
//! The built-in stages (`host_filter`, `secret_injector`, hook rules) are configured by their own
//! fields and flags. The syntax of routes and the price file are checked by the planner, before
//! any VM boots.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// One `network.plugins[]` entry, as written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// The plugin: `local_model_router`, `usage_logger` or `budget_gate`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Whether it runs (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Its settings.
    #[serde(default)]
    pub config: Value,
}

/// `local_model_router`'s settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// Where routes without their own backend go (`HOST:PORT`; Ollama's `127.0.0.1:11434`
    /// when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// `SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL[@HOST:PORT]`, in order.
    pub routes: Vec<String>,
}

/// `usage_logger`'s settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct UsageConfig {
    /// The JSON-lines log, appended to.
    pub path: PathBuf,
    /// Prices that replace the shipped table's entries by model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_file: Option<PathBuf>,
}

/// `budget_gate`'s settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Spend in USD after which every request is refused with 429.
    pub limit_usd: f64,
}

// The limit is checked finite before use, so equality is an equivalence on every value kept.
impl Eq for BudgetConfig {}

/// The plugins a sandbox runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(default)]
pub struct PluginsConfig {
    /// `local_model_router`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_model_router: Option<RouterConfig>,
    /// `usage_logger`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage_logger: Option<UsageConfig>,
    /// `budget_gate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub budget_gate: Option<BudgetConfig>,
}

impl PluginsConfig {
    /// Whether no plugin runs.
    pub fn is_empty(&self) -> bool {
        self.local_model_router.is_none()
            && self.usage_logger.is_none()
            && self.budget_gate.is_none()
    }

    /// Reads `network.plugins[]` entries (`what` names where they came from in errors).
    /// Disabled entries are skipped; an unknown type, a repeated one, or a config of the wrong
    /// shape is an error.
    pub fn from_specs(specs: &[PluginSpec], what: &str) -> Result<PluginsConfig, String> {
        let mut out = PluginsConfig::default();
        let mut seen = std::collections::HashSet::new();
        for (i, s) in specs.iter().enumerate() {
            let at = format!("{what}[{i}] ({})", s.kind);
            if !seen.insert(s.kind.as_str()) {
                return Err(format!("{at}: {} appears twice; configure it once", s.kind));
            }
            if s.enabled == Some(false) {
                continue;
            }
            // A plugin without settings reads as an empty object, so missing fields are named.
            let config = if s.config.is_null() {
                Value::Object(Default::default())
            } else {
                s.config.clone()
            };
            let bad = |e: serde_json::Error| format!("{at}: config: {e}");
            match s.kind.as_str() {
                "local_model_router" => {
                    out.local_model_router = Some(serde_json::from_value(config).map_err(bad)?)
                }
                "usage_logger" => {
                    out.usage_logger = Some(serde_json::from_value(config).map_err(bad)?)
                }
                "budget_gate" => out.budget_gate = Some(serde_json::from_value(config).map_err(bad)?),
                "host_filter" | "secret_injector" => {
                    return Err(format!(
                        "{at}: a built-in stage, configured by allowed_hosts and secrets (--allow-host, --secret), not as a plugin"
                    ))
                }
                other => {
                    return Err(format!(
                        "{what}[{i}]: unknown plugin type {other:?}; known: local_model_router, usage_logger, budget_gate"
                    ))
                }
            }
        }
        Ok(out)
    }

    /// Adds `other`'s plugins; a plugin configured in both is an error naming `what`.
    pub fn merge(&mut self, other: PluginsConfig, what: &str) -> Result<(), String> {
        let twice =
            |name: &str| format!("{name} is configured both by flags and in {what}; keep one");
        if let Some(r) = other.local_model_router {
            if self.local_model_router.is_some() {
                return Err(twice("local_model_router"));
            }
            self.local_model_router = Some(r);
        }
        if let Some(u) = other.usage_logger {
            if self.usage_logger.is_some() {
                return Err(twice("usage_logger"));
            }
            self.usage_logger = Some(u);
        }
        if let Some(b) = other.budget_gate {
            if self.budget_gate.is_some() {
                return Err(twice("budget_gate"));
            }
            self.budget_gate = Some(b);
        }
        Ok(())
    }

    /// The checks that need no other crate: a budget needs a usage log (the spend is read from
    /// it), a positive limit, and a router needs routes.
    pub fn check(&self) -> Result<(), String> {
        if let Some(b) = &self.budget_gate {
            if !b.limit_usd.is_finite() || b.limit_usd <= 0.0 {
                return Err(format!(
                    "budget limit {}: must be a positive amount of USD",
                    b.limit_usd
                ));
            }
            if self.usage_logger.is_none() {
                return Err(
                    "--budget-limit-usd (budget_gate) needs --usage-log-path (usage_logger): the spend is read from the usage log"
                        .into(),
                );
            }
        }
        if let Some(r) = &self.local_model_router {
            if r.routes.is_empty() {
                return Err(
                    "local_model_router has no routes: add --local-model-route SOURCE_HOST/SOURCE_MODEL=TARGET_MODEL"
                        .into(),
                );
            }
        }
        if let Some(u) = &self.usage_logger {
            if u.path.as_os_str().is_empty() {
                return Err("usage_logger needs a path (--usage-log-path)".into());
            }
        }
        Ok(())
    }
}

/// Reads a plugins file: `{"network": {"plugins": [...]}}` (the RPC `create` shape) or a bare
/// `[...]` of entries.
pub fn parse_plugins_file(text: &str, what: &str) -> Result<PluginsConfig, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("{what}: not JSON: {e}"))?;
    let list = match &v {
        Value::Array(_) => v.clone(),
        Value::Object(o) => o
            .get("network")
            .and_then(|n| n.get("plugins"))
            .cloned()
            .ok_or_else(|| {
                format!(
                    "{what}: expected {{\"network\": {{\"plugins\": [...]}}}} or a list of plugins"
                )
            })?,
        _ => {
            return Err(format!(
                "{what}: expected {{\"network\": {{\"plugins\": [...]}}}} or a list of plugins"
            ))
        }
    };
    let specs: Vec<PluginSpec> =
        serde_json::from_value(list).map_err(|e| format!("{what}: network.plugins: {e}"))?;
    PluginsConfig::from_specs(&specs, &format!("{what}: network.plugins"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn specs(v: Value) -> Vec<PluginSpec> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn entries_become_typed_plugins() {
        let p = PluginsConfig::from_specs(
            &specs(json!([
                {"type": "local_model_router", "config": {"backend": "127.0.0.1:11434", "routes": ["openrouter.ai/a=b"]}},
                {"type": "usage_logger", "enabled": true, "config": {"path": "/tmp/u.jsonl"}},
                {"type": "budget_gate", "config": {"limit_usd": 5}},
            ])),
            "network.plugins",
        )
        .unwrap();
        assert_eq!(
            p.local_model_router.as_ref().unwrap().routes,
            ["openrouter.ai/a=b"]
        );
        assert_eq!(
            p.usage_logger.as_ref().unwrap().path,
            PathBuf::from("/tmp/u.jsonl")
        );
        assert_eq!(p.budget_gate.as_ref().unwrap().limit_usd, 5.0);
        p.check().unwrap();
        // Disabled entries are skipped.
        let off = PluginsConfig::from_specs(
            &specs(json!([{"type": "budget_gate", "enabled": false, "config": {"limit_usd": 1}}])),
            "p",
        )
        .unwrap();
        assert!(off.is_empty());
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let err = |v: Value| PluginsConfig::from_specs(&specs(v), "network.plugins").unwrap_err();
        let e = err(json!([{"type": "nope"}]));
        assert!(
            e.contains("unknown plugin type \"nope\"") && e.contains("usage_logger"),
            "{e}"
        );
        let e = err(json!([{"type": "budget_gate", "config": {"limit": 5}}]));
        assert!(
            e.contains("network.plugins[0] (budget_gate)") && e.contains("limit"),
            "{e}"
        );
        let e = err(json!([{"type": "usage_logger"}]));
        assert!(e.contains("path"), "{e}");
        let e = err(
            json!([{"type": "budget_gate", "config": {"limit_usd": 1}}, {"type": "budget_gate", "config": {"limit_usd": 2}}]),
        );
        assert!(e.contains("twice"), "{e}");
        let e = err(json!([{"type": "host_filter"}]));
        assert!(e.contains("--allow-host"), "{e}");
        assert!(
            serde_json::from_value::<Vec<PluginSpec>>(json!([{"type": "x", "extra": 1}])).is_err()
        );
        // A budget needs the usage log it is read from, and a positive limit.
        let b = PluginsConfig {
            budget_gate: Some(BudgetConfig { limit_usd: 5.0 }),
            ..Default::default()
        };
        assert!(b.check().unwrap_err().contains("--usage-log-path"));
        let b = PluginsConfig {
            budget_gate: Some(BudgetConfig { limit_usd: -1.0 }),
            usage_logger: Some(UsageConfig {
                path: "/u".into(),
                price_file: None,
            }),
            ..Default::default()
        };
        assert!(b.check().is_err());
        let r = PluginsConfig {
            local_model_router: Some(RouterConfig::default()),
            ..Default::default()
        };
        assert!(r.check().unwrap_err().contains("--local-model-route"));
    }

    #[test]
    fn files_and_merging() {
        let p = parse_plugins_file(
            r#"{"network": {"plugins": [{"type": "usage_logger", "config": {"path": "/u"}}]}}"#,
            "plugins.json",
        )
        .unwrap();
        assert!(p.usage_logger.is_some());
        let bare = parse_plugins_file(
            r#"[{"type": "budget_gate", "config": {"limit_usd": 2}}]"#,
            "f",
        )
        .unwrap();
        assert!(bare.budget_gate.is_some());
        assert!(parse_plugins_file("{}", "f")
            .unwrap_err()
            .contains("network"));
        assert!(parse_plugins_file("nope", "f")
            .unwrap_err()
            .contains("not JSON"));
        let mut flags = PluginsConfig {
            usage_logger: Some(UsageConfig {
                path: "/a".into(),
                price_file: None,
            }),
            ..Default::default()
        };
        flags.merge(bare, "f").unwrap();
        assert!(flags.budget_gate.is_some());
        assert!(flags
            .merge(p, "plugins.json")
            .unwrap_err()
            .contains("usage_logger"));
    }
}
