//! The price table `usage_logger` uses when a provider reports no cost: USD per million input,
//! output and cached-input tokens, by model. A table ships with matchlock (`prices.json`,
//! dated); a file the user gives replaces entries by name.

use serde::Deserialize;
use std::collections::BTreeMap;

/// Prices of one model, USD per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    /// Input (prompt) tokens not read from a cache.
    pub input: f64,
    /// Output (completion) tokens.
    pub output: f64,
    /// Input tokens read from the provider's prompt cache (the input price when absent).
    #[serde(default)]
    pub cached_input: Option<f64>,
}

impl Price {
    /// The cost of a call. `cached` tokens are part of `input` (as OpenAI counts them); they are
    /// charged at the cached price instead.
    pub fn cost(&self, input: u64, output: u64, cached: u64) -> f64 {
        let cached = cached.min(input);
        let per = 1e-6;
        (input - cached) as f64 * self.input * per
            + cached as f64 * self.cached_input.unwrap_or(self.input) * per
            + output as f64 * self.output * per
    }
}

/// A price table.
#[derive(Debug, Clone, PartialEq)]
pub struct Prices {
    models: BTreeMap<String, Price>,
}

const SHIPPED: &str = include_str!("prices.json");

impl Prices {
    /// The table that ships with matchlock.
    pub fn shipped() -> Prices {
        // A unit test parses the shipped file, so this cannot fail in a build that passed it.
        Prices::parse(SHIPPED).unwrap_or(Prices {
            models: BTreeMap::new(),
        })
    }

    /// Parses a table: a JSON object of model name to `{"input", "output", "cached_input"?}`
    /// (keys starting with `_` are comments).
    pub fn parse(text: &str) -> Result<Prices, String> {
        let raw: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON object of prices: {e}"))?;
        let mut models = BTreeMap::new();
        for (name, v) in raw {
            if name.starts_with('_') {
                continue;
            }
            let p: Price = serde_json::from_value(v).map_err(|e| {
                format!("{name}: {e} (expected {{\"input\": USD, \"output\": USD, \"cached_input\": USD}} per million tokens)")
            })?;
            let prices = [Some(p.input), Some(p.output), p.cached_input];
            if prices.iter().flatten().any(|x| !x.is_finite() || *x < 0.0) {
                return Err(format!("{name}: prices must be finite and not negative"));
            }
            models.insert(name.to_ascii_lowercase(), p);
        }
        Ok(Prices { models })
    }

    /// The shipped table with `file`'s entries on top.
    pub fn with_file(path: &std::path::Path) -> Result<Prices, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("price file {}: {e}", path.display()))?;
        let extra =
            Prices::parse(&text).map_err(|e| format!("price file {}: {e}", path.display()))?;
        let mut p = Prices::shipped();
        p.models.extend(extra.models);
        Ok(p)
    }

    /// The price of `model`: an exact entry, else the longest entry the name starts with (dated
    /// snapshots such as `gpt-4o-2024-08-06`), trying the name without a provider prefix
    /// (`openai/gpt-4o`) too.
    pub fn lookup(&self, model: &str) -> Option<Price> {
        let model = model.to_ascii_lowercase();
        let bare = model.rsplit('/').next().unwrap_or(&model).to_string();
        for name in [&model, &bare] {
            if let Some(p) = self.models.get(name.as_str()) {
                return Some(*p);
            }
        }
        for name in [&model, &bare] {
            let best = self
                .models
                .iter()
                .filter(|(k, _)| {
                    name.starts_with(k.as_str())
                        && name[k.len()..].starts_with(['-', '@', ':', '.'])
                })
                .max_by_key(|(k, _)| k.len());
            if let Some((_, p)) = best {
                return Some(*p);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_table_parses_and_looks_up_by_prefix() {
        let p = Prices::parse(SHIPPED).unwrap();
        assert!(p.lookup("gpt-4o").is_some());
        // The longest prefix wins: a dated mini model is priced as mini, not as gpt-4o.
        assert_eq!(p.lookup("gpt-4o-mini-2024-07-18"), p.lookup("gpt-4o-mini"));
        assert_eq!(p.lookup("gpt-4o-2024-08-06"), p.lookup("gpt-4o"));
        assert_eq!(p.lookup("openai/gpt-4o"), p.lookup("gpt-4o"));
        assert_eq!(
            p.lookup("anthropic/claude-sonnet-4-20250514"),
            p.lookup("claude-sonnet-4")
        );
        assert_eq!(p.lookup("GPT-4O"), p.lookup("gpt-4o"));
        // A prefix must end at a separator: "o3" does not price "o3x".
        assert!(p.lookup("o3x").is_none());
        assert!(p.lookup("llama3.1:8b").is_none());
    }

    #[test]
    fn cost_charges_cached_input_at_its_price() {
        let p = Price {
            input: 2.0,
            output: 10.0,
            cached_input: Some(0.5),
        };
        let c = p.cost(1_000_000, 100_000, 400_000);
        assert!(
            (c - (0.6 * 2.0 + 0.4 * 0.5 + 0.1 * 10.0)).abs() < 1e-9,
            "{c}"
        );
        // More cached than input is clamped, never negative.
        assert!(p.cost(10, 0, 50) >= 0.0);
    }

    #[test]
    fn bad_tables_say_what_is_wrong() {
        assert!(Prices::parse("[]").is_err());
        let e = Prices::parse(r#"{"m": {"input": 1}}"#).unwrap_err();
        assert!(e.contains("m:") && e.contains("output"), "{e}");
        assert!(Prices::parse(r#"{"m": {"input": -1, "output": 1}}"#).is_err());
        assert!(Prices::parse(r#"{"m": {"input": 1, "output": 1, "typo": 2}}"#).is_err());
        let e = Prices::with_file(std::path::Path::new("/nonexistent/prices.json")).unwrap_err();
        assert!(e.contains("/nonexistent/prices.json"), "{e}");
    }
}
