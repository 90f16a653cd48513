//! The network of a sandbox: a userspace TCP/IP stack (smoltcp) that is the only peer of the guest's
//! NIC. QEMU hands it the guest's Ethernet frames over a Unix socket (`-netdev stream`); every TCP
//! connection and UDP flow the guest opens is checked against the egress [`Policy`] and relayed
//! through an ordinary host socket, so the sandbox needs no TAP device, no firewall rules and no
//! privileges, and leaves nothing in the host kernel when it ends.

// Everything here handles what the guest sends: a panic would be the guest crashing the host side.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod dns;
mod frames;
pub mod policy;
pub mod setup;
mod stack;

pub use policy::Policy;
pub use stack::{serve, Limits, NetConfig, ALIAS_BASE};
