//! hearth: a host agent that keeps the right local LLMs warm behind one OpenAI-compatible endpoint.
//!
//! See `docs/architecture.md` for how the pieces fit: [`config`] → [`supervisor`] (the single owner
//! of all runtime state, driving [`runtime`] processes on the decisions of the pure [`scheduler`]) ←
//! [`proxy`] (asks for grants, never touches processes); [`admin`] and [`metrics`] expose state.

pub mod admin;
pub mod cgroup;
pub mod config;
pub mod confine;
pub mod daemon;
pub mod gpu;
pub mod metrics;
pub mod pagecache;
pub mod proxy;
pub mod runtime;
pub mod scheduler;
pub mod sensor;
pub mod supervisor;
