//! The dashboards and alert rules against a real Prometheus server scraping real sidecars (two
//! replicas, each consuming two queues): every rule loads and evaluates without error; every
//! template variable's `label_values()` query returns the replicas and queues; every panel query
//! parses and returns data with the variables set as Grafana sets them (one value, several, and
//! "All"); and taking the app down makes `RabbitSidecarAppDown` go pending, then clear.
//!
//! Needs `/usr/bin/prometheus` (Debian package `prometheus`); fails saying so when it is missing.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::common::monitoring::{Prometheus, repo};
use crate::common::*;
use serde_json::Value;

/// A template variable's selection, as a Grafana user makes it.
#[derive(Clone, Debug)]
enum Selection {
    One(String),
    Several(Vec<String>),
    All,
}

/// A dashboard's template variable (a `query` variable).
struct Variable {
    name: String,
    query: String,
    multi: bool,
    include_all: bool,
    all_value: Option<String>,
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn variables(dashboard: &Value) -> Vec<Variable> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| Variable {
            name: v["name"].as_str().unwrap().to_owned(),
            query: v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .expect("a query string")
                .to_owned(),
            multi: v["multi"].as_bool().unwrap_or(false),
            include_all: v["includeAll"].as_bool().unwrap_or(false),
            all_value: v["allValue"].as_str().map(str::to_owned),
        })
        .collect()
}

/// Escapes regular-expression metacharacters the way Grafana's Prometheus data source does for
/// multi-value and "All"-capable variables (a backslash, itself escaped in the PromQL string).
fn regex_escape(value: &str) -> String {
    let mut out = String::new();
    for c in value.chars() {
        if "$^*+?.()|\\{}[]".contains(c) {
            out.push_str("\\\\");
        }
        out.push(c);
    }
    out
}

/// What Grafana puts in place of `$name` for this variable and selection.
fn interpolated(variable: &Variable, selection: &Selection, options: &[String]) -> String {
    if !variable.multi && !variable.include_all {
        let Selection::One(value) = selection else {
            panic!("${} takes one value", variable.name)
        };
        return value.replace('\\', "\\\\").replace('\'', "\\\\'");
    }
    let values: Vec<String> = match selection {
        Selection::All => match &variable.all_value {
            Some(all) => return all.clone(),
            None => options.to_vec(),
        },
        Selection::One(value) => vec![value.clone()],
        Selection::Several(values) => {
            assert!(variable.multi, "${} takes one value", variable.name);
            values.clone()
        }
    };
    let escaped: Vec<String> = values.iter().map(|v| regex_escape(v)).collect();
    match escaped.as_slice() {
        [one] => one.clone(),
        many => format!("({})", many.join("|")),
    }
}

/// Replaces Grafana's variables in `expr`: the dashboard's own and the built-in intervals.
fn substitute(expr: &str, values: &[(String, String)]) -> String {
    let mut expr = expr
        .replace("$__rate_interval", "30s")
        .replace("$__interval", "5s")
        .replace("$__range", "5m");
    // Longest names first, so that `$instance` is not taken for `$in` followed by "stance".
    let mut values = values.to_vec();
    values.sort_by_key(|(name, _)| std::cmp::Reverse(name.len()));
    for (name, value) in &values {
        expr = expr
            .replace(&format!("${{{name}}}"), value)
            .replace(&format!("${name}"), value);
    }
    assert!(
        !expr.contains('$'),
        "a variable is left in the query: {expr}"
    );
    expr
}

/// `label_values(selector, label)`, the only variable query form the dashboards use.
fn label_values_query(query: &str) -> (&str, &str) {
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("not a label_values() query: {query}"));
    let (selector, label) = inner
        .rsplit_once(',')
        .unwrap_or_else(|| panic!("label_values() without a selector: {query}"));
    (selector.trim(), label.trim())
}

/// Every Prometheus query of the dashboard's panels: (where, expression).
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut stack = vec![&dashboard["panels"]];
    while let Some(v) = stack.pop() {
        for panel in v.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?");
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    let ref_id = target["refId"].as_str().unwrap_or("?");
                    out.push((format!("{title:?} {ref_id}"), expr.to_owned()));
                }
            }
            if let Some(nested) = panel.get("panels") {
                stack.push(nested);
            }
        }
    }
    out
}

/// The series selectors (`metric{matchers}`) in a query.
fn selectors(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(start) = rest.find("rabbit_sidecar_") {
        let tail = &rest[start..];
        let name_end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let after = &tail[name_end..];
        if after.starts_with('{') {
            let close = after.find('}').expect("a closing brace");
            out.push(format!("{}{}", &tail[..name_end], &after[..=close]));
            rest = &after[close..];
        } else {
            rest = after;
        }
    }
    out
}

/// Label values of `label` across a query's result series.
fn labels_of(result: &[Value], label: &str) -> BTreeSet<String> {
    result
        .iter()
        .filter_map(|series| series["metric"][label].as_str().map(str::to_owned))
        .collect()
}

/// Resolves the dashboard's variables in order, as Grafana does on load: each variable's query
/// runs with the earlier ones already set, its options must be exactly `expected[name]`, and the
/// selection `choose(name, options)` is made. Returns the values to put in the panel queries.
async fn resolve_variables(
    prom: &Prometheus,
    file: &str,
    dashboard: &Value,
    expected: &dyn Fn(&str) -> BTreeSet<String>,
    choose: &dyn Fn(&str, &[String]) -> Selection,
) -> (Vec<(String, String)>, Vec<(String, Selection)>) {
    let mut values: Vec<(String, String)> = Vec::new();
    let mut selections = Vec::new();
    for variable in variables(dashboard) {
        let (selector, label) = label_values_query(&variable.query);
        let selector = substitute(selector, &values);
        let options = prom
            .label_values(label, &selector)
            .await
            .unwrap_or_else(|e| panic!("{file}: ${} query {selector} fails: {e}", variable.name));
        assert_eq!(
            options.iter().cloned().collect::<BTreeSet<_>>(),
            expected(&variable.name),
            "{file}: ${} = label_values({selector}, {label}) offers the wrong options",
            variable.name
        );
        let selection = choose(&variable.name, &options);
        values.push((
            variable.name.clone(),
            interpolated(&variable, &selection, &options),
        ));
        selections.push((variable.name.clone(), selection));
    }
    (values, selections)
}

#[tokio::test]
async fn dashboards_and_rules_work_against_a_real_prometheus() {
    let broker = Broker::connect().await;
    let queues = [unique("prom-a"), unique("prom-b")];
    for queue in &queues {
        broker.track(queue);
    }
    let mut app = App::start().await;
    app.answer(|r| match r.id().as_str() {
        "reject" => 400,
        "fail" => 500,
        _ => 200,
    });
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("sidecar.toml");
    std::fs::write(
        &config,
        format!(
            "amqp-url = \"{amqp}\"\ntarget-url = \"{}\"\ndeclare = true\nqueue-type = \"classic\"\n\
             [[subscription]]\nqueue = \"{}\"\n[[subscription]]\nqueue = \"{}\"\n",
            app.url(),
            queues[0],
            queues[1],
            amqp = amqp()
        ),
    )
    .unwrap();
    let flags = [
        "--config",
        config.to_str().unwrap(),
        "--retry-backoff",
        "100ms",
        "--max-deliveries",
        "2",
        "--queue-poll-interval",
        "1s",
        "--app-probe-interval",
        "200ms",
    ];
    let sidecars = [Sidecar::start(&flags), Sidecar::start(&flags)];
    for sidecar in &sidecars {
        sidecar.wait_ready(Duration::from_secs(20)).await;
    }
    let instances: BTreeSet<String> = sidecars.iter().map(|s| s.admin.to_string()).collect();
    let targets: Vec<String> = instances.iter().map(|i| format!("'{i}'")).collect();
    let rules = repo("alerts/rabbit-sidecar.rules.yml");
    let mut prom = Prometheus::start(dir.path(), |_| {
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: rabbit-sidecar\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        )
    });
    prom.wait_ready(Duration::from_secs(30)).await;
    for queue in &queues {
        broker.publish_n(queue, 30, "ok").await;
        broker
            .publish(
                queue,
                b"reject",
                lapin::BasicProperties::default().with_timestamp(1),
            )
            .await;
        broker.publish(queue, b"fail", Default::default()).await;
    }
    for queue in &queues {
        let dlq = format!("{queue}.dead-letter");
        assert!(
            eventually(Duration::from_secs(20), || async {
                broker.count(&dlq).await.map(|c| c.0) == Some(2)
            })
            .await
        );
    }

    // Prometheus scrapes both replicas and has loaded every rule without error.
    assert!(
        eventually(Duration::from_secs(30), || async {
            prom.query("up{job=\"rabbit-sidecar\"} == 1")
                .await
                .is_ok_and(|r| r.len() == 2)
        })
        .await,
        "prometheus scrapes both sidecars"
    );
    // Let a few scrapes accumulate so rate() has two points.
    assert!(
        eventually(Duration::from_secs(30), || async {
            prom.query("count_over_time(rabbit_sidecar_acks_total[1m]) >= 4")
                .await
                .is_ok_and(|r| labels_of(&r, "queue").len() == 2)
        })
        .await
    );
    let rules = prom.get("/api/v1/rules").await.expect("rules API answers");
    let groups = rules["data"]["groups"].as_array().expect("rule groups");
    let mut rule_count = 0;
    for g in groups {
        for r in g["rules"].as_array().unwrap() {
            rule_count += 1;
            assert_eq!(
                r["health"], "ok",
                "rule {} evaluates: {}",
                r["name"], r["lastError"]
            );
        }
    }
    assert!(
        rule_count >= 10,
        "the repo's rules are loaded ({rule_count})"
    );

    // Every variable query offers what exists, and every panel query returns data, with the
    // variables set as a user sets them. A multi-value selection must also reach every value it
    // names, and a narrow one must not leak others.
    let queue_set: BTreeSet<String> = queues.iter().cloned().collect();
    let first_instance = instances.first().unwrap().clone();
    let expected = |name: &str| -> BTreeSet<String> {
        match name {
            "job" => BTreeSet::from(["rabbit-sidecar".to_string()]),
            "instance" => instances.clone(),
            "queue" => queue_set.clone(),
            other => panic!("unexpected variable {other}"),
        }
    };
    type Chooser<'a> = Box<dyn Fn(&str, &[String]) -> Selection + 'a>;
    let first = |name: &str, options: &[String]| -> Selection {
        match name {
            "instance" => Selection::One(first_instance.clone()),
            "queue" => Selection::One(queues[1].clone()),
            _ => Selection::One(options[0].clone()),
        }
    };
    let cases: Vec<(&str, &str, Chooser)> = vec![
        (
            "dashboards/rabbit-sidecar-overview.json",
            "All",
            Box::new(|name, options| match name {
                "job" => Selection::One(options[0].clone()),
                _ => Selection::All,
            }),
        ),
        (
            "dashboards/rabbit-sidecar-overview.json",
            "every value picked",
            Box::new(|name, options| match name {
                "job" => Selection::One(options[0].clone()),
                _ => Selection::Several(options.to_vec()),
            }),
        ),
        (
            "dashboards/rabbit-sidecar-overview.json",
            "one value each",
            Box::new(first),
        ),
        (
            "dashboards/rabbit-sidecar-instance.json",
            "one value each",
            Box::new(first),
        ),
    ];
    let mut failures = Vec::new();
    for (file, case, choose) in &cases {
        let dashboard = read_json(&repo(file));
        let (values, selections) =
            resolve_variables(&prom, file, &dashboard, &expected, choose.as_ref()).await;
        let selected = |name: &str| {
            selections
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| s.clone())
                .unwrap_or_else(|| panic!("{file} has no ${name}"))
        };
        let (queue_selection, instance_selection) = (selected("queue"), selected("instance"));
        let queries = panel_queries(&dashboard);
        assert!(queries.len() >= 10, "{file} has queries");
        let (mut seen_queues, mut seen_instances) = (BTreeSet::new(), BTreeSet::new());
        for (place, expr) in queries {
            let expr = substitute(&expr, &values);
            let result = match prom.query(&expr).await {
                Ok(result) => result,
                Err(e) => panic!("{file} ({case}) {place}: {expr}\n  does not run: {e}"),
            };
            if result.is_empty() {
                failures.push(format!("{file} ({case}) {place}: no data from {expr}"));
            }
            // `... or vector(0)` always has data: each selector must find series on its own.
            for selector in selectors(&expr) {
                if prom.query(&selector).await.map_or(true, |r| r.is_empty()) {
                    failures.push(format!(
                        "{file} ({case}) {place}: {selector} matches nothing, in {expr}"
                    ));
                }
            }
            let (queues_here, instances_here) =
                (labels_of(&result, "queue"), labels_of(&result, "instance"));
            for (label, here, selection) in [
                ("queue", &queues_here, &queue_selection),
                ("instance", &instances_here, &instance_selection),
            ] {
                if let Selection::One(only) = selection
                    && here.iter().any(|v| v != only)
                {
                    failures.push(format!(
                        "{file} ({case}) {place}: {label} {only} selected, got {here:?} from {expr}"
                    ));
                }
            }
            seen_queues.extend(queues_here);
            seen_instances.extend(instances_here);
        }
        if matches!(queue_selection, Selection::All | Selection::Several(_)) {
            assert_eq!(seen_queues, queue_set, "{file} ({case}) shows every queue");
            assert_eq!(
                seen_instances, instances,
                "{file} ({case}) shows every replica"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The app goes down: the app-down alert goes pending (it has a `for:`), then clears.
    app.down();
    broker.publish_n(&queues[0], 3, "down").await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            matches!(
                prom.alert_state("RabbitSidecarAppDown").await.as_deref(),
                Some("pending" | "firing")
            )
        })
        .await,
        "RabbitSidecarAppDown goes pending"
    );
    app.up().await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            prom.alert_state("RabbitSidecarAppDown").await.is_none()
        })
        .await,
        "RabbitSidecarAppDown clears when the app is back"
    );
    broker.cleanup().await;
}
