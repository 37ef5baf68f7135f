//! The dataflow operators of hookflow, as extension traits on timely streams.
//!
//! Records flow through them in this order: [`dedup::Dedup`] keeps the first occurrence of each
//! (tenant, event id); [`route::Route`] looks each event up in the arranged subscriptions and
//! fans it out into deliveries, one per subscribed endpoint; [`deliver::Deliver`] sends each
//! delivery over HTTP. Timestamps are milliseconds since the Unix epoch: the time a record or
//! delivery is due. The operators know nothing of the source or the archive: the `hookflow`
//! crate wires them to both.

#![warn(missing_docs)]

pub mod alerts;
pub mod clock;
pub mod dedup;
pub mod deliver;
pub mod health;
pub mod rate_limit;
pub mod retry;
pub mod retry_after;
pub mod route;
pub mod stop;
