//! The logic of the network plugins that act on model calls, decided without sockets:
//! `local_model_router` ([`routes`]), `usage_logger` ([`usage`], priced by [`prices`]) and
//! `budget_gate` ([`budget`]). The proxy runs them as stages of its pipeline (gate, route,
//! request transform, response transform).

pub mod budget;
pub mod prices;
pub mod routes;
pub mod usage;
