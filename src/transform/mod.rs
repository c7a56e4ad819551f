//! Declarative transforms: canonical events → writes into a service's database (pure).
