//! Tests that need no broker: the shipped assets (compose file, manifests, dashboards, alert
//! rules, checked by the validators their readers use) and `rabbit-sidecar remediate`.

mod ops_assets;
mod remediate;
