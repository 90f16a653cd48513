//! The network of a sandbox: a userspace TCP/IP stack (smoltcp) that is the only peer of the
//! guest's NIC. QEMU hands it the guest's Ethernet frames over a Unix socket (`-netdev stream`);
//! every TCP connection and UDP flow the guest opens is decided by the sandbox's
//! [`Policy`](matchlock_policy::Policy) and relayed through an ordinary host socket that only
//! that decision opens. In interception mode TCP flows go through the [`proxy`], which asks the
//! same policy per request. The sandbox needs no TAP device, no firewall rules and no
//! privileges, and leaves nothing in the host kernel when it ends.
//!
//! Follow a guest TCP flow: [`serve`] (frames in and out, `stack.rs`) → the policy's decision →
//! `connect.rs` (the host socket) or [`proxy`] (classify, gate, secrets, rules, upstream).
//! [`harness`] puts an in-memory guest on the other end, so all of it is tested without a VM.

// Everything here handles what the guest sends: a panic would be the guest crashing the host side.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
// Host sockets are opened only in `connect`, each for a policy decision (clippy.toml lists the
// constructors it replaces).
#![cfg_attr(not(test), deny(clippy::disallowed_methods))]

mod connect;
pub mod dns;
mod frames;
pub mod harness;
pub mod proxy;
pub mod setup;
mod stack;

pub use stack::{serve, Limits, NetConfig, ALIAS_BASE};
