//! relayd: a layer-4 TCP and UDP relay that balances sessions across backends and dials each backend
//! out of a chosen network interface or source address.
//!
//! Actors exchange messages over bounded flume channels:
//! a **Listener** per route accepts connections (or tracks UDP flows) and opens a **Session** for each; the Session asks
//! its route's **Balancer** for a backend and the relay's **Dialer** for an upstream socket that
//! leaves by the backend's egress, then relays both directions. [`Relay`] starts them from a
//! [`Config`], runs synthetic sessions with [`Relay::inject`], and stops them with
//! [`Relay::shutdown`].
//!
//! # Layout
//! - [`config`]: the RON file structs and their validation into typed [`Settings`].
//! - [`acl`] and [`http`]: what CONNECT routes allow, and the little HTTP they speak;
//!   [`proto`]: the PROXY protocol header, read from a proxy in front and sent to backends, and
//!   the TLS ClientHello an `sni` route reads its server name from.
//! - [`relay`]: wiring and the stop sequence.
//! - `listener`, `balancer`, `dialer`, `session`: one module per actor; `checker`: the
//!   active health checks.
//! - `egress`: the kernel's link, address and route state, as verdicts on each egress.
//! - [`shutdown`]: stop signals and the session drain.
//! - [`stats`]: relay-wide counters, with a way to wait on them.
//! - `status`: the status listener: a page for people, and `/metrics` (`metrics`) for Prometheus.
//! - [`admin`]: the admin socket, where an operator drains, disables and enables backends and
//!   egresses at run time (`relayd ctl`).
//! - [`rt`]: the only module that names the async runtime.
//! - [`logging`]: the daemon's log output (pretty or ndjson).
//! - [`limits`]: the file-descriptor budget and the session cap it sets.

pub mod acl;
pub mod admin;
pub mod balancer;
mod checker;
pub mod config;
pub mod dialer;
mod egress;
pub mod error;
pub mod http;
pub mod limits;
mod listener;
pub mod logging;
mod metrics;
mod net;
pub mod proto;
pub mod relay;
pub mod rt;
pub mod session;
pub mod shutdown;
pub mod stats;
mod status;

pub use balancer::{BackendSnapshot, EgressSnapshot, HealthState};
pub use config::{BackendConfig, Config, EgressConfig, RouteConfig, Settings};
pub use error::{ConfigError, DialError, Fault, InjectError, StartError};
pub use relay::{Relay, RouteSnapshot, ShutdownReport, run};
pub use rt::Conn;
pub use session::{SessionEnd, SessionReport, Transfer};
pub use stats::Stats;
