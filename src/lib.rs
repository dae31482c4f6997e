//! Jumping VPN, the program: configuration files, the gateway and client commands over
//! the actor runtime (`jvpn-actors`), the admin socket, status views, host network
//! changes over netlink, and the network lab of the demo (which the end-to-end tests
//! extend in the dev-only crate `jvpn-lab`).

pub mod admin;
pub mod announce;
pub mod client;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod netconf;
pub mod netlab;
pub mod netlink;
pub mod policy_file;
pub mod reload;
pub mod service;
pub mod simulate;
pub mod views;
