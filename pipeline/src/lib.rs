//! hookflow: webhook delivery as a timely dataflow.
//!
//! This crate wires the pieces together: the configuration file ([`config`]), the source
//! operator over the embedded local log ([`source`]), the dataflow from decode to archive
//! ([`dataflow`]), operational alerts published back into the source ([`alerts`]), the
//! `publish` command ([`publish`]), a loopback webhook receiver used by the demo and the tests
//! ([`receiver`]), the demo ([`demo`]), and the endpoint listing and re-enabling
//! ([`endpoints`]). The `hookflow` binary is a thin command line over these.

#![warn(missing_docs)]

pub mod alerts;
pub mod cluster;
pub mod config;
pub mod dataflow;
pub mod demo;
pub mod durable;
pub mod endpoints;
pub mod http;
pub mod metrics;
pub mod monitor;
pub mod publish;
pub mod receiver;
pub mod registry;
pub mod source;
