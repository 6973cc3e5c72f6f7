//! Performing a restart: restart a Docker container, delete a Kubernetes pod, or run a program.
//!
//! What is touched comes from the configured [`Target`]. Alert data reaches this module only as
//! [`AlertFacts`], and is used in exactly one place: for a `label_selector` Kubernetes target, the
//! alert's `pod` label picks which of the selected pods to delete, after a strict name check and
//! only if the API server lists that pod under the configured selector and namespace. Nothing from
//! an alert is ever placed in a command line, an environment variable or a Docker request.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, HOST};
use hyper::{Method, Request};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::client::{self, ClientError, Response};
use super::config::{PodChoice, Target, is_dns1123_subdomain};
use crate::encode::path_segment;

/// Extra time on top of Docker's stop timeout for the restart request to complete.
const DOCKER_SLACK: Duration = Duration::from_secs(30);
/// Bound on the list-then-delete exchange with the API server.
const KUBERNETES_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of a failing program's stderr to keep for the log.
const STDERR_EXCERPT_BYTES: u64 = 4096;

/// The only alert data an action may look at.
#[derive(Debug, Clone, Default)]
pub struct AlertFacts {
    pub alertname: String,
    pub namespace: Option<String>,
    pub pod: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{what} answered {status}: {body}")]
    Status {
        what: &'static str,
        status: u16,
        body: String,
    },
    #[error("timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{program} exited with {status}: {stderr}")]
    Exit {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error("refused: {0}")]
    Refused(String),
}

/// Restarts `target`; on success returns a short description of what was done.
pub async fn restart(target: &Target, alert: &AlertFacts) -> Result<String, ActionError> {
    match target {
        Target::DockerRestart {
            container,
            socket,
            stop_timeout,
        } => {
            let limit = *stop_timeout + DOCKER_SLACK;
            tokio::time::timeout(limit, docker_restart(socket, container, *stop_timeout))
                .await
                .map_err(|_| ActionError::Timeout(limit))?
        }
        Target::KubernetesDeletePod { .. } => {
            tokio::time::timeout(KUBERNETES_TIMEOUT, kubernetes_delete_pod(target, alert))
                .await
                .map_err(|_| ActionError::Timeout(KUBERNETES_TIMEOUT))?
        }
        Target::Command {
            program,
            args,
            timeout,
        } => run_command(program, args, *timeout).await,
    }
}

async fn docker_restart(
    socket: &std::path::Path,
    container: &str,
    stop_timeout: Duration,
) -> Result<String, ActionError> {
    // `container` was checked against Docker's name syntax at start-up: safe in a path as is.
    let uri = format!(
        "/containers/{container}/restart?t={}",
        stop_timeout.as_secs()
    );
    let request = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(HOST, "docker")
        .body(Full::new(Bytes::new()))
        .expect("static request parts are valid");
    let response = client::send_unix(socket, request).await?;
    expect_success("Docker", &response)?;
    Ok(format!("container {container} restarted"))
}

async fn kubernetes_delete_pod(target: &Target, alert: &AlertFacts) -> Result<String, ActionError> {
    let Target::KubernetesDeletePod {
        api_server,
        namespace,
        pod,
        token_file,
        ca_file,
    } = target
    else {
        unreachable!("called for kubernetes targets only");
    };
    // Read at each use: projected service-account tokens are rotated by the kubelet.
    let token = tokio::fs::read_to_string(token_file)
        .await
        .map_err(|source| ActionError::ReadFile {
            path: token_file.display().to_string(),
            source,
        })?;
    let bearer = format!("Bearer {}", token.trim());
    let request = |method: Method, path: String| {
        Request::builder()
            .method(method)
            .uri(path)
            .header(
                HOST,
                api_server.authority().map(|a| a.as_str()).unwrap_or(""),
            )
            .header(AUTHORIZATION, bearer.as_str())
            .header("accept", "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| ActionError::Refused(format!("cannot build request: {e}")))
    };

    let name = match pod {
        PodChoice::Named(name) => name.clone(),
        PodChoice::Selector(selector) => {
            let name = alert_pod(alert, namespace)?;
            let path = format!(
                "/api/v1/namespaces/{namespace}/pods?labelSelector={}",
                path_segment(selector)
            );
            let response =
                client::send_to(api_server, ca_file, request(Method::GET, path)?).await?;
            expect_success("Kubernetes API (list pods)", &response)?;
            let list: PodList = serde_json::from_slice(&response.body)
                .map_err(|e| ActionError::Refused(format!("unexpected pod list: {e}")))?;
            if !list.items.iter().any(|p| p.metadata.name == name) {
                return Err(ActionError::Refused(format!(
                    "pod {name:?} is not selected by {selector:?} in namespace {namespace}"
                )));
            }
            name
        }
    };
    let path = format!("/api/v1/namespaces/{namespace}/pods/{name}");
    let response = client::send_to(api_server, ca_file, request(Method::DELETE, path)?).await?;
    expect_success("Kubernetes API (delete pod)", &response)?;
    Ok(format!("pod {namespace}/{name} deleted"))
}

/// The alert's pod, if it is a well-formed name and does not claim another namespace.
fn alert_pod(alert: &AlertFacts, namespace: &str) -> Result<String, ActionError> {
    let pod = alert.pod.as_deref().ok_or_else(|| {
        ActionError::Refused("the alert has no pod label to choose among the selected pods".into())
    })?;
    if !is_dns1123_subdomain(pod) {
        return Err(ActionError::Refused(format!(
            "the alert's pod label {pod:?} is not a valid pod name"
        )));
    }
    if let Some(ns) = alert.namespace.as_deref()
        && ns != namespace
    {
        return Err(ActionError::Refused(format!(
            "the alert's namespace {ns:?} is not the configured namespace {namespace:?}"
        )));
    }
    Ok(pod.to_owned())
}

#[derive(Deserialize)]
struct PodList {
    items: Vec<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    metadata: PodMetadata,
}

#[derive(Deserialize)]
struct PodMetadata {
    name: String,
}

fn expect_success(what: &'static str, response: &Response) -> Result<(), ActionError> {
    if response.status.is_success() {
        Ok(())
    } else {
        Err(ActionError::Status {
            what,
            status: response.status.as_u16(),
            body: response.excerpt(),
        })
    }
}

async fn run_command(
    program: &std::path::Path,
    args: &[String],
    timeout: Duration,
) -> Result<String, ActionError> {
    let display = program.display().to_string();
    // No shell: the program receives exactly the configured arguments.
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| ActionError::Spawn {
            program: display.clone(),
            source,
        })?;
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let read_stderr = async move {
        let mut excerpt = Vec::new();
        let _ = (&mut stderr)
            .take(STDERR_EXCERPT_BYTES)
            .read_to_end(&mut excerpt)
            .await;
        // Keep draining so a chatty program never blocks on a full pipe.
        let _ = tokio::io::copy(&mut stderr, &mut tokio::io::sink()).await;
        excerpt
    };
    let finished =
        tokio::time::timeout(timeout, async { tokio::join!(child.wait(), read_stderr) }).await;
    // On timeout, `child` is dropped here and `kill_on_drop` kills it.
    let (status, excerpt) = finished.map_err(|_| ActionError::Timeout(timeout))?;
    let status = status.map_err(|source| ActionError::Spawn {
        program: display.clone(),
        source,
    })?;
    if status.success() {
        Ok(format!("{display} exited successfully"))
    } else {
        Err(ActionError::Exit {
            program: display,
            status,
            stderr: String::from_utf8_lossy(&excerpt).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alert_pod_is_checked() {
        let facts = |pod: Option<&str>, ns: Option<&str>| AlertFacts {
            alertname: "X".into(),
            pod: pod.map(Into::into),
            namespace: ns.map(Into::into),
        };
        assert_eq!(
            alert_pod(&facts(Some("web-1"), None), "shop").unwrap(),
            "web-1"
        );
        assert_eq!(
            alert_pod(&facts(Some("web-1"), Some("shop")), "shop").unwrap(),
            "web-1"
        );
        assert!(alert_pod(&facts(None, None), "shop").is_err());
        assert!(alert_pod(&facts(Some("../secrets"), None), "shop").is_err());
        assert!(alert_pod(&facts(Some("web-1?x=1"), None), "shop").is_err());
        assert!(alert_pod(&facts(Some("web-1"), Some("kube-system")), "shop").is_err());
    }

    #[test]
    fn selector_is_encoded() {
        assert_eq!(path_segment("app=web,tier!=db"), "app%3Dweb%2Ctier%21%3Ddb");
    }

    #[tokio::test]
    async fn command_failures_are_reported() {
        let err = run_command(
            "/bin/sh".as_ref(),
            &["-c".into(), "echo boom >&2; exit 3".into()],
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("boom") && text.contains('3'), "{text}");

        let err = run_command(
            "/bin/sleep".as_ref(),
            &["10".into()],
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ActionError::Timeout(_)), "{err}");

        let err = run_command("/nonexistent/program".as_ref(), &[], Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, ActionError::Spawn { .. }), "{err}");
    }
}
