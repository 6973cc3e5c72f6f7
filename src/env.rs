//! The one way the sidecar reads its environment: through an [`EnvSource`], the process
//! environment in production ([`ProcessEnv`]) and a closure over a map in tests, so no test has to
//! mutate the real environment. Configuration keys, OTLP settings and the remediation receiver's
//! secrets all come through it.

/// Reads one environment variable.
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

/// A closure is an environment: `&|name| map.get(name).cloned()`.
impl<F: Fn(&str) -> Option<String>> EnvSource for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}
