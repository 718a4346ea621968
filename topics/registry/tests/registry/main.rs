//! Integration tests: the real registry router over a real PostgreSQL, one fresh database each.

mod api;
mod compatibility;
mod conformance;
mod support;
