//! Dapr's `Configuration` file (`--config FILE`, `kind: Configuration`): the parts tandemd uses.
//!
//! - `spec.accessControl`: which callers may invoke which operations ([`crate::acl`]).
//! - Mutual TLS: `spec.mtls.enabled: true` turns it on, as `--enable-mtls` does (a file cannot
//!   turn off what the flag turned on); the sidecar's trust domain comes from
//!   `spec.mtls.trustDomain` or `spec.accessControl.trustDomain`, which must agree when both are
//!   set, and then replaces `--trust-domain`. Dapr's other `spec.mtls` fields
//!   (`workloadCertTTL`, `allowedClockSkew`, `sentryAddress`, `controlPlaneTrustDomain`)
//!   configure its Sentry CA, which Tandem has no need of; they are accepted and ignored, as
//!   are the spec's other sections.

use std::path::Path;

use serde::Deserialize;

use crate::acl::{AccessControl, AccessControlSpec};

/// What a `Configuration` file sets for this sidecar.
#[derive(Debug, Default)]
pub struct Configuration {
    /// `None`: every call allowed.
    pub access_control: Option<AccessControl>,
    /// `spec.mtls.enabled`.
    pub mtls_enabled: bool,
    /// The trust domain the file names, if it names one.
    pub trust_domain: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigurationFile {
    kind: String,
    #[serde(default)]
    spec: ConfigurationSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigurationSpec {
    access_control: Option<AccessControlSpec>,
    mtls: Option<MtlsSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MtlsSpec {
    enabled: Option<bool>,
    trust_domain: Option<String>,
}

impl Configuration {
    pub fn load(path: &Path) -> Result<Configuration, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: cannot be read: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Configuration, String> {
        let file: ConfigurationFile =
            serde_saphyr::from_str(text).map_err(|e| format!("not a valid Configuration: {e}"))?;
        if file.kind != "Configuration" {
            return Err(format!("kind is '{}', expected Configuration", file.kind));
        }
        let named = |domain: Option<String>| domain.filter(|d| !d.trim().is_empty());
        let mtls = file.spec.mtls;
        let mtls_domain = named(mtls.as_ref().and_then(|m| m.trust_domain.clone()));
        let access_domain = named(file.spec.access_control.as_ref().and_then(|a| a.trust_domain.clone()));
        let trust_domain = match (mtls_domain, access_domain) {
            (Some(mtls), Some(access)) if mtls != access => {
                return Err(format!(
                    "spec.mtls.trustDomain '{mtls}' and spec.accessControl.trustDomain '{access}' differ; \
                     a sidecar has one trust domain"
                ));
            }
            (mtls, access) => mtls.or(access),
        };
        let access_control = match file.spec.access_control {
            Some(spec) => AccessControl::from_spec(spec)?,
            None => None,
        };
        let mtls_enabled = mtls.and_then(|m| m.enabled).unwrap_or(false);
        Ok(Configuration { access_control, mtls_enabled, trust_domain })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mtls_section_turns_mtls_on_and_names_the_trust_domain() {
        let file = "kind: Configuration\nspec:\n  mtls:\n    enabled: true\n    workloadCertTTL: 24h\n    \
                    allowedClockSkew: 15m\n    trustDomain: example.org\n  tracing:\n    samplingRate: '1'\n";
        let configuration = Configuration::parse(file).unwrap();
        assert!(configuration.mtls_enabled);
        assert_eq!(configuration.trust_domain.as_deref(), Some("example.org"));
        assert!(configuration.access_control.is_none(), "no accessControl: every call allowed");

        // Dapr's Sentry settings alone turn nothing on.
        let sentry = Configuration::parse("kind: Configuration\nspec:\n  mtls:\n    workloadCertTTL: 1h\n").unwrap();
        assert!(!sentry.mtls_enabled);
        assert_eq!(sentry.trust_domain, None);
    }

    #[test]
    fn the_trust_domain_comes_from_either_section_and_both_must_agree() {
        // accessControl's trust domain counts even without policies.
        let access = "kind: Configuration\nspec:\n  accessControl:\n    trustDomain: corp\n";
        assert_eq!(Configuration::parse(access).unwrap().trust_domain.as_deref(), Some("corp"));
        let both = "kind: Configuration\nspec:\n  mtls:\n    trustDomain: corp\n  accessControl:\n    \
                    trustDomain: corp\n    defaultAction: allow\n";
        let configuration = Configuration::parse(both).unwrap();
        assert_eq!(configuration.trust_domain.as_deref(), Some("corp"));
        assert!(configuration.access_control.is_some());
        let differ = "kind: Configuration\nspec:\n  mtls:\n    trustDomain: a\n  accessControl:\n    trustDomain: b\n";
        let error = Configuration::parse(differ).unwrap_err();
        assert!(error.contains("'a'") && error.contains("'b'"), "{error}");
        let bad = "kind: Configuration\nspec:\n  mtls:\n    enabled: sometimes\n";
        assert!(Configuration::parse(bad).unwrap_err().contains("not a valid Configuration"));
    }
}
