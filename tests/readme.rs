//! The README is the user's contract: every flag, environment variable and metric family the
//! sidecar has must be documented there, so adding one without its documentation fails here.

use std::path::Path;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap()
}

#[test]
fn every_flag_and_variable_is_in_the_configuration_table() {
    let readme = readme();
    for key in rabbit_sidecar::config::keys::ALL
        .iter()
        .filter(|k| k.is_flag())
    {
        let flag = format!("| `--{}` |", key.name);
        let env = format!("`{}`", key.env());
        assert!(
            readme.contains(&flag),
            "README's configuration table lacks {flag}"
        );
        assert!(readme.contains(&env), "README lacks {env}");
    }
}

#[test]
fn every_metric_family_is_in_the_metrics_table() {
    let readme = readme();
    let metrics = rabbit_sidecar::telemetry::metrics::Metrics::new(&["q"]);
    for name in metrics.family_names() {
        if name.starts_with("process_") {
            continue;
        }
        assert!(
            readme.contains(&format!("| `{name}` |")),
            "README's metrics table lacks {name}"
        );
    }
}
