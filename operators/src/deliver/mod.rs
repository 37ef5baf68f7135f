//! Delivery: sending each webhook over HTTP and recording the attempt.
//!
//! [`DeliveryClient::attempt`] makes one signed POST and returns an [`AttemptResult`];
//! [`Deliver`] is the timely operator that runs attempts on a tokio runtime without
//! blocking its worker and turns each into an [`AttemptRow`](hookflow_schemas::AttemptRow).
//! [`AddressPolicy`] decides which addresses may be contacted, [`sign`] computes a Standard
//! Webhooks signature, and [`classify`] maps what an attempt observed to its outcome.

use std::net::IpAddr;

mod address;
mod client;
mod headers;
mod operator;
mod result;
mod signature;

pub use address::{refused_range, AddressPolicy, RefusedRange};
pub use client::{
    without_credentials, ClientConfig, DeliveryClient, PolicyResolver, SystemResolver,
    DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_SNIPPET_BYTES, USER_AGENT,
};
pub use headers::{parse_static_header, RESERVED_HEADERS};
pub use operator::{
    endpoint_hash, Attempted, BreakerOpened, Deliver, DeliverContext, DeliverCounters,
    EndpointDisabled, EndpointUpdate, LiveDirectory, ParkedDeliveries, PayloadSource,
    DEFAULT_MAX_IN_FLIGHT_TOTAL, HOLD_REFRESH_MS,
};
pub use result::{
    classify, contacted_endpoint, dead_letter_row, is_overload, is_retryable, AttemptResult,
    Observation, Verdict,
};
pub use signature::{sign, signature_header, SECRET_PREFIX};

/// Errors of the delivery module.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// reqwest could not build an HTTP client.
    #[error("failed to build the HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// A signing secret is malformed. The message never contains the secret.
    #[error("invalid signing secret: {reason}")]
    InvalidSecret {
        /// The problem with the secret.
        reason: String,
    },
    /// The endpoint's host has no address the [`AddressPolicy`] permits.
    #[error(
        "address {address} of host `{host}` is {range}, which the address policy rejects; \
         list its network in `delivery.allowed_private_cidrs` if the endpoint is trusted"
    )]
    AddressRefused {
        /// The host as written in the endpoint URL.
        host: String,
        /// The first address rejected.
        address: IpAddr,
        /// The range that rejects the address.
        range: RefusedRange,
    },
    /// A static header of an endpoint cannot be sent. The message never contains its value.
    #[error("invalid static header `{name}`: {reason}")]
    InvalidHeader {
        /// The header name as configured.
        name: String,
        /// The problem with the header.
        reason: String,
    },
    /// The endpoint URL cannot be attempted.
    #[error("endpoint URL is invalid: {reason}")]
    InvalidUrl {
        /// What is wrong with the URL.
        reason: String,
    },
    /// The endpoint URL is `http` while only `https` is allowed.
    #[error(
        "endpoint URL uses http, but `delivery.https_only` allows only https; change the \
         endpoint's url to https"
    )]
    HttpsRequired,
    /// The configured proxy cannot be used.
    #[error("invalid proxy: {reason}")]
    InvalidProxy {
        /// What is wrong with the proxy URL.
        reason: String,
    },
    /// The CA bundle is not PEM certificates.
    #[error("invalid CA bundle: not a list of PEM certificates")]
    InvalidCaBundle(#[source] reqwest::Error),
    /// The endpoint's host name resolved to no address at all.
    #[error("host `{host}` resolved to no address")]
    NoAddress {
        /// The host as written in the endpoint URL.
        host: String,
    },
}
