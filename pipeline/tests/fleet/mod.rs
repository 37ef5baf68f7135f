//! The endpoint fleet shared by the kill test and the cluster tests: two endpoints per tenant,
//! one subscribed to every type and one to `charge.*`, and the pattern rule the tests use as
//! their oracle for which endpoints an event reaches.

/// The signing secret of every endpoint.
pub const SECRET: &str = "whsec_RTPHghziaKPNKV/Y78ALF6hfDn11pL7egmdm4fV+DaE=";

/// The tenants whose events are published.
pub const TENANTS: [&str; 4] = ["acme", "globex", "initech", "umbrella"];

/// (endpoint id, tenant, receiver path, event-type pattern) of every endpoint.
pub fn endpoints() -> Vec<(String, &'static str, String, &'static str)> {
    let mut endpoints = Vec::new();
    for tenant in TENANTS {
        endpoints.push((
            format!("ep_{tenant}_all"),
            tenant,
            format!("/{tenant}/all"),
            "*",
        ));
        endpoints.push((
            format!("ep_{tenant}_charges"),
            tenant,
            format!("/{tenant}/charges"),
            "charge.*",
        ));
    }
    endpoints
}

/// Returns whether `pattern` (`*`, `prefix.*` or an exact type) matches `event_type`, written
/// apart from the pipeline's own matcher so that the tests check it.
pub fn matches(pattern: &str, event_type: &str) -> bool {
    pattern == "*"
        || pattern
            .strip_suffix('*')
            .is_some_and(|prefix| event_type.starts_with(prefix))
        || pattern == event_type
}
