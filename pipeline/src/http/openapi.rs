//! The OpenAPI 3.1 document served at `/openapi.json`, generated from the handlers'
//! `#[utoipa::path]` annotations and the response types' `ToSchema` derives.
//!
//! Every route of [`super::router`] is listed here; a test compares the two both ways.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::ErrorBody;
use super::ingest::Acceptance;

/// The document's root.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "hookflow",
        description = "Management, ingest, health and metrics of a hookflow run. Errors are JSON with a stable `code`, a `message` and, for bad input, the `field`."
    ),
    paths(
        crate::monitor::metrics,
        crate::monitor::live,
        crate::monitor::ready,
        super::openapi_json,
        super::ingest::post_event,
        super::inspect::get_event,
        super::inspect::endpoint_failures,
        super::resend::resend_event,
        super::resend::resend_failed,
        super::endpoints::create,
        super::endpoints::list,
        super::endpoints::get_one,
        super::endpoints::update,
        super::endpoints::delete,
    ),
    components(schemas(
        ErrorBody,
        Acceptance,
        crate::monitor::LiveBody,
        crate::monitor::Readiness,
        crate::monitor::Check,
        super::inspect::EventView,
        super::inspect::FailuresView,
        super::resend::Resend,
        super::resend::ResendEventRequest,
        super::endpoints::EndpointView,
        super::endpoints::DisabledView,
        super::endpoints::EndpointList,
        super::endpoints::EndpointWithSecret,
        super::endpoints::CreateEndpoint,
        super::endpoints::UpdateEndpoint,
    )),
    modifiers(&BearerTokens),
    tags(
        (name = "events", description = "ingest, inspect and resend events"),
        (name = "endpoints", description = "manage endpoints, list their failures, resend"),
        (name = "operations", description = "health, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// Declares the two bearer tokens the routes name in `security`.
struct BearerTokens;

impl Modify for BearerTokens {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for name in ["admin_token", "producer_token"] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// Builds the document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
