//! Jumping VPN, the program: configuration files, the gateway and client commands over
//! the actor runtime (`jvpn-actors`), the admin socket, status views, host network
//! changes, and the network lab the demo and the end-to-end tests run in.

pub mod admin;
pub mod client;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod lab;
pub mod netconf;
pub mod netlab;
pub mod policy_file;
pub mod service;
pub mod simulate;
pub mod views;
