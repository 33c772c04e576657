//! relayd's integration tests, one binary with a module per theme (each module's first lines
//! say what it covers); `harness` is what they share. `tests/embed.rs` is a binary of its own,
//! since it counts the threads of its process.

mod harness;

mod admin;
mod availability;
mod balancing;
mod clients;
mod config;
mod connect;
mod daemon;
mod dns;
mod edge;
mod endings;
mod faults;
mod haproxy;
mod integrity;
mod netns;
mod prometheus;
mod reload;
mod shutdown;
mod sni;
mod status;
mod tcp_relay;
mod udp_relay;
mod zero_copy;
