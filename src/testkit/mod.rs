//! What tests, benchmarks and the demo need and the product does not (the `testkit` feature):
//! documents in the monolith's shapes ([`workload`]), in-memory implementations of ficus's own
//! traits ([`memory`]) that drive a role without a server, and a sink wrapper that fails the
//! writes a test chooses ([`faulty`]).

pub mod faulty;
pub mod memory;
pub mod workload;
