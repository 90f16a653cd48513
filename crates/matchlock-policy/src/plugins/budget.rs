//! `budget_gate`: once the spend in the usage log reaches the limit, every further request is
//! refused with 429 and an OpenAI-style error, so agents that handle rate limits stop cleanly.

use super::usage::UsageLog;
use serde_json::json;
use std::sync::Arc;

/// A spending limit over a usage log.
#[derive(Debug, Clone)]
pub struct BudgetGate {
    limit_usd: f64,
    log: Arc<UsageLog>,
}

/// A refusal by the budget gate: what the guest gets.
#[derive(Debug, Clone, PartialEq)]
pub struct OverBudget {
    /// USD spent.
    pub spent_usd: f64,
    /// The limit.
    pub limit_usd: f64,
}

impl OverBudget {
    /// HTTP status: 429.
    pub const STATUS: u16 = 429;

    /// The JSON body, shaped like OpenAI's errors so SDKs surface it.
    pub fn body(&self) -> Vec<u8> {
        let v = json!({"error": {
            "message": format!(
                "matchlock budget exhausted: ${:.4} spent of a ${} limit (--budget-limit-usd); no further requests are sent",
                self.spent_usd, self.limit_usd
            ),
            "type": "insufficient_quota",
            "code": "budget_exceeded",
            "param": null,
        }});
        serde_json::to_vec(&v).unwrap_or_default()
    }
}

impl BudgetGate {
    /// A gate over `log` with `limit_usd` (positive and finite).
    pub fn new(limit_usd: f64, log: Arc<UsageLog>) -> Result<BudgetGate, String> {
        if !limit_usd.is_finite() || limit_usd <= 0.0 {
            return Err(format!(
                "--budget-limit-usd {limit_usd}: must be a positive amount of USD"
            ));
        }
        Ok(BudgetGate { limit_usd, log })
    }

    /// The limit.
    pub fn limit_usd(&self) -> f64 {
        self.limit_usd
    }

    /// Allows a request while the spend is under the limit; returns the spend so far.
    pub fn check(&self) -> Result<f64, OverBudget> {
        let spent = self.log.spent();
        if spent >= self.limit_usd {
            return Err(OverBudget {
                spent_usd: spent,
                limit_usd: self.limit_usd,
            });
        }
        Ok(spent)
    }
}

#[cfg(test)]
mod tests {
    use super::super::prices::Prices;
    use super::super::usage::{Call, Usage};
    use super::*;

    #[test]
    fn the_gate_closes_at_the_limit_and_stays_closed_across_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("usage.jsonl");
        let log = Arc::new(UsageLog::open(&path).unwrap());
        let gate = BudgetGate::new(1.0, log.clone()).unwrap();
        assert!(gate.check().is_ok());
        let u = Usage {
            reported_cost: Some(0.6),
            seen: true,
            ..Usage::default()
        };
        let call = Call::priced("openrouter.ai", Some("m"), u, &Prices::shipped(), None, 1);
        log.record(&call, "t").unwrap();
        assert!(gate.check().is_ok());
        log.record(&call, "t").unwrap();
        let over = gate.check().unwrap_err();
        let body: serde_json::Value = serde_json::from_slice(&over.body()).unwrap();
        assert_eq!(body["error"]["code"], "budget_exceeded");
        assert!(body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("of a $1 limit"));
        // A new run on the same log starts over budget.
        let again = BudgetGate::new(1.0, Arc::new(UsageLog::open(&path).unwrap())).unwrap();
        assert!(again.check().is_err());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(BudgetGate::new(bad, log.clone()).is_err());
        }
    }
}
