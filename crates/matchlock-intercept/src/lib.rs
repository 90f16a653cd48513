//! The policy half of Matchlock's network interception, independent of any socket: which hosts a
//! sandbox may reach ([`hosts`]), what a TCP flow speaks ([`classify`]), the per-sandbox MITM
//! certificate authority ([`ca`]) and how secrets are substituted and kept out of the guest
//! ([`secrets`]). The network stack (`matchlock-net`) applies these to live flows.

// Everything here handles what the guest sends: a panic would be the guest crashing the host side.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod ca;
pub mod classify;
pub mod events;
pub mod hosts;
pub mod proxy;
pub mod rules;
pub mod secrets;
