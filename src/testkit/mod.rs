//! What tests, benchmarks and the demo need and the product does not (the `testkit` feature):
//! documents in the monolith's shapes ([`workload`]), and in-memory implementations of ficus's
//! own traits ([`memory`]) that drive a role without a server.

pub mod memory;
pub mod workload;
