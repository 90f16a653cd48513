//! What a sandbox may do on the network, decided without opening a network connection (hook
//! callbacks reach the SDK over its local Unix socket): which addresses it may reach
//! ([`address`]), which hosts ([`hosts`]), what a TCP flow speaks ([`classify`]), how secrets are
//! substituted and kept out of the guest ([`secrets`]), the hook rules ([`rules`]),
//! the per-sandbox MITM certificate authority ([`ca`]) and the event log ([`events`]).
//!
//! [`Policy`] joins them into the answers the network stack and its proxy (`matchlock-net`)
//! act on: an [`Allowed`] that opening a host connection requires, or a [`Denial`] with one HTTP
//! status, one event and one log line.

// Everything here handles what the guest sends: a panic would be the guest crashing the host side.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod address;
pub mod ca;
pub mod callback;
pub mod classify;
mod decision;
pub mod events;
pub mod hosts;
pub mod plugins;
mod policy;
pub mod rules;
pub mod secrets;

pub use address::AddressPolicy;
pub use decision::{Allowed, Denial, Route, Target};
pub use policy::{HostsUpdate, Policy, RequestHead};
