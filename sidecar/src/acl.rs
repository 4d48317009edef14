//! Access control for service invocation, from Dapr's `Configuration` file (`--config`,
//! `spec.accessControl`), enforced by the callee's sidecar before its app sees a call.
//!
//! Dapr's rules, in its order of precedence:
//! - No `accessControl`, or one with neither a default action nor policies: every call is
//!   allowed. Policies without a default action: the global default is deny.
//! - The caller is identified by its verified SPIFFE id (mutual TLS). A caller that cannot be
//!   verified (no mTLS), or whose trust domain or namespace differs from its app's policy,
//!   gets the global default.
//! - Within the caller's policy, the most specific operation whose `name` matches the call's
//!   path (`*` one segment, `**` any number) decides: its `action` when the call's HTTP verb is
//!   in its `httpVerb` list (`*` for any; a gRPC call has no verb, so the verb is not checked),
//!   else the policy's own default action, else the global one.
//!
//! Paths are normalized before matching, so that a rule cannot be walked around: percent-escapes
//! decoded (`%2F`, `%2e`), empty and `.` segments dropped, `..` applied; a path that climbs
//! above its root, or decodes to something that is not text, is denied.

use std::collections::HashMap;

use serde::Deserialize;
use tandem_transport::SpiffeId;

/// Dapr's default trust domain and namespace of a policy.
const DEFAULT_TRUST_DOMAIN: &str = "public";
const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// `spec.accessControl` of a `Configuration` file (read by [`crate::configuration`]).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AccessControlSpec {
    default_action: Option<Action>,
    /// The sidecar's trust domain, when set (see [`crate::configuration`]).
    pub(crate) trust_domain: Option<String>,
    #[serde(default)]
    policies: Vec<PolicySpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PolicySpec {
    /// `appId` (Dapr's docs) or `app` (older ones).
    #[serde(alias = "app")]
    app_id: String,
    default_action: Option<Action>,
    trust_domain: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    operations: Vec<OperationSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OperationSpec {
    name: String,
    #[serde(default)]
    http_verb: Vec<String>,
    action: Option<Action>,
}

/// The access control of one sidecar: what its app accepts from whom.
#[derive(Debug, Clone)]
pub struct AccessControl {
    default_action: Action,
    policies: HashMap<String, Policy>,
}

#[derive(Debug, Clone)]
struct Policy {
    trust_domain: String,
    namespace: String,
    default_action: Option<Action>,
    operations: Vec<Operation>,
}

#[derive(Debug, Clone)]
struct Operation {
    /// The normalized pattern's segments.
    segments: Vec<String>,
    /// Upper-case verbs; `*` for any.
    verbs: Vec<String>,
    action: Action,
}

/// Why a call was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub caller: String,
    pub operation: String,
    pub verb: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "access control denied {} the operation '{}'", self.caller, self.operation)?;
        if let Some(verb) = &self.verb {
            write!(f, " ({verb})")?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl AccessControl {
    /// The access control of a `Configuration` file's text: `None` when it has no
    /// `accessControl` (every call allowed).
    #[cfg(test)]
    pub fn parse(text: &str) -> Result<Option<AccessControl>, String> {
        Ok(crate::configuration::Configuration::parse(text)?.access_control)
    }

    /// From the file's `spec.accessControl`: `None` when it has neither a default action nor
    /// policies.
    pub(crate) fn from_spec(spec: AccessControlSpec) -> Result<Option<AccessControl>, String> {
        if spec.default_action.is_none() && spec.policies.is_empty() {
            return Ok(None);
        }
        let mut policies = HashMap::new();
        for policy in spec.policies {
            let mut operations = Vec::new();
            for operation in policy.operations {
                let segments = normalize(&operation.name).map_err(|e| {
                    format!("policy for app '{}': operation name '{}' {e}", policy.app_id, operation.name)
                })?;
                let verbs = operation.http_verb.iter().map(|verb| verb.trim().to_ascii_uppercase()).collect();
                operations.push(Operation { segments, verbs, action: operation.action.unwrap_or(Action::Allow) });
            }
            let entry = Policy {
                trust_domain: policy.trust_domain.filter(|t| !t.is_empty()).unwrap_or(DEFAULT_TRUST_DOMAIN.into()),
                namespace: policy.namespace.filter(|n| !n.is_empty()).unwrap_or(DEFAULT_NAMESPACE.into()),
                default_action: policy.default_action,
                operations,
            };
            if policies.insert(policy.app_id.clone(), entry).is_some() {
                return Err(format!("two policies for app '{}'", policy.app_id));
            }
        }
        Ok(Some(AccessControl { default_action: spec.default_action.unwrap_or(Action::Deny), policies }))
    }

    /// Whether `caller` (verified, or `None`) may call `method` with `verb` (HTTP calls only).
    pub fn check(&self, caller: Option<&SpiffeId>, method: &str, verb: Option<&str>) -> Result<(), Denied> {
        let denied = |reason: String, operation: String| Denied {
            caller: caller.map_or("an unverified caller (no mutual TLS)".into(), |id| id.to_string()),
            operation,
            verb: verb.map(str::to_string),
            reason,
        };
        let path = match normalize(method) {
            Ok(segments) => segments,
            Err(e) => return Err(denied(format!("the path {e}"), method.to_string())),
        };
        let operation = format!("/{}", path.join("/"));
        let global = |why: &str| match self.default_action {
            Action::Allow => Ok(()),
            Action::Deny => Err(denied(format!("{why}; the default action is deny"), operation.clone())),
        };
        let Some(caller) = caller else { return global("the caller's identity is not verified") };
        let Some(policy) = self.policies.get(&caller.app_id) else {
            return global(&format!("no policy for app '{}'", caller.app_id));
        };
        if policy.trust_domain != caller.trust_domain || policy.namespace != caller.namespace {
            return global(&format!(
                "the policy for app '{}' is for trust domain '{}' and namespace '{}'",
                caller.app_id, policy.trust_domain, policy.namespace
            ));
        }
        let matched = policy
            .operations
            .iter()
            .filter(|operation| matches(&operation.segments, &path))
            .max_by_key(|operation| specificity(&operation.segments));
        let verb_allowed = |operation: &Operation| match verb {
            None => true,
            Some(verb) => operation.verbs.iter().any(|v| v == "*" || v.eq_ignore_ascii_case(verb)),
        };
        let (action, why) = match matched {
            Some(operation) if verb_allowed(operation) => {
                (operation.action, format!("operation '/{}' says so", operation.segments.join("/")))
            }
            _ => match policy.default_action {
                Some(action) => (action, format!("the policy for app '{}' defaults to it", caller.app_id)),
                None => return global(&format!("no operation of the policy for app '{}' matches", caller.app_id)),
            },
        };
        match action {
            Action::Allow => Ok(()),
            Action::Deny => Err(denied(why, operation)),
        }
    }
}

/// The segments of `path` after one round of percent-decoding, without empty and `.`
/// segments, with `..` applied.
fn normalize(path: &str) -> Result<Vec<String>, String> {
    let decoded = percent_decode(path)?;
    let mut segments: Vec<String> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err("climbs above its root".into());
                }
            }
            other => segments.push(other.to_string()),
        }
    }
    Ok(segments)
}

fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(byte) => {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                None => return Err("has a '%' that is not a percent-escape".into()),
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "does not decode to UTF-8 text".into())
}

/// Whether `pattern` (with `*` and `**` segments) matches `path`.
fn matches(pattern: &[String], path: &[String]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => (0..=path.len()).any(|skip| matches(rest, &path[skip..])),
        Some((first, rest)) => {
            path.split_first().is_some_and(|(segment, tail)| (first == "*" || first == segment) && matches(rest, tail))
        }
    }
}

/// More literal segments first, then fewer `**`: `/a/b` over `/a/*` over `/a/**` over `/**`.
fn specificity(pattern: &[String]) -> (usize, usize, std::cmp::Reverse<usize>) {
    let literal = pattern.iter().filter(|s| *s != "*" && *s != "**").count();
    let single = pattern.iter().filter(|s| *s == "*").count();
    let multi = pattern.iter().filter(|s| *s == "**").count();
    (literal, single, std::cmp::Reverse(multi))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
apiVersion: dapr.io/v1alpha1
kind: Configuration
metadata:
  name: appconfig
spec:
  accessControl:
    defaultAction: deny
    trustDomain: public
    policies:
    - appId: frontend
      defaultAction: deny
      namespace: default
      operations:
      - name: /orders/**
        httpVerb: ['GET', 'POST']
        action: allow
      - name: /orders/admin/**
        httpVerb: ['*']
        action: deny
      - name: /status
        httpVerb: ['*']
        action: allow
    - app: batch
      defaultAction: allow
      trustDomain: public
      namespace: jobs
"#;

    fn acl() -> AccessControl {
        AccessControl::parse(FILE).unwrap().unwrap()
    }

    fn id(app: &str, namespace: &str) -> SpiffeId {
        SpiffeId::new("public", namespace, app)
    }

    #[test]
    fn operations_verbs_and_defaults_decide_as_in_dapr() {
        let acl = acl();
        let frontend = id("frontend", "default");
        assert!(acl.check(Some(&frontend), "orders/17", Some("GET")).is_ok());
        assert!(acl.check(Some(&frontend), "/orders/17/items", Some("POST")).is_ok());
        // A verb not listed falls to the policy's default (deny).
        let denied = acl.check(Some(&frontend), "orders/17", Some("DELETE")).unwrap_err();
        assert!(denied.to_string().contains("spiffe://public/ns/default/frontend"), "{denied}");
        assert!(denied.to_string().contains("'/orders/17' (DELETE)"), "{denied}");
        // The more specific operation wins.
        assert!(acl.check(Some(&frontend), "orders/admin/drop", Some("GET")).is_err());
        // gRPC calls carry no verb: the operation's action decides.
        assert!(acl.check(Some(&frontend), "status", None).is_ok());
        assert!(acl.check(Some(&frontend), "other", None).is_err());
        // Another app, another namespace, or no verified identity: the global default.
        assert!(acl.check(Some(&id("stranger", "default")), "status", None).is_err());
        assert!(acl.check(Some(&id("frontend", "jobs")), "status", None).is_err());
        assert!(acl.check(None, "status", None).unwrap_err().reason.contains("not verified"));
        assert!(acl.check(Some(&id("batch", "jobs")), "anything/at/all", Some("PUT")).is_ok());
        assert!(acl.check(Some(&id("batch", "default")), "anything", Some("PUT")).is_err());
    }

    #[test]
    fn encoded_and_doubled_paths_cannot_walk_around_a_rule() {
        let acl = acl();
        let frontend = id("frontend", "default");
        let denied = [
            "orders/admin/drop",
            "orders//admin/drop",
            "orders/./admin/drop",
            "orders/x/../admin/drop",
            "orders/x/%2e%2e/admin/drop",
            "orders/x/%2E%2E/admin/drop",
            "orders%2Fadmin%2Fdrop",
            "orders%2fadmin/drop",
            "/orders/admin%2F..%2Fadmin/drop",
            "status/../orders/admin/drop",
            "../status",
            "status/../../status",
            "orders/%zz",
            "orders/%ff%fe",
        ];
        for path in denied {
            assert!(acl.check(Some(&frontend), path, Some("GET")).is_err(), "{path} was allowed");
        }
        let allowed = ["orders/admin/../17", "orders/%41", "/./orders/17/", "status%2F", "orders/x/%2e%2e/17"];
        for path in allowed {
            assert!(acl.check(Some(&frontend), path, Some("GET")).is_ok(), "{path} was denied");
        }
    }

    #[test]
    fn files_without_rules_allow_everything_and_bad_files_are_refused() {
        assert!(AccessControl::parse("kind: Configuration\nspec: {}\n").unwrap().is_none());
        assert!(AccessControl::parse("kind: Configuration\nspec:\n  accessControl: {}\n").unwrap().is_none());
        let policies_only =
            "kind: Configuration\nspec:\n  accessControl:\n    policies:\n    - appId: a\n      defaultAction: allow\n";
        let acl = AccessControl::parse(policies_only).unwrap().unwrap();
        assert!(acl.check(Some(&id("b", "default")), "x", None).is_err(), "policies alone default to deny");
        assert!(AccessControl::parse("kind: Component\n").unwrap_err().contains("expected Configuration"));
        let bad_action = "kind: Configuration\nspec:\n  accessControl:\n    defaultAction: maybe\n";
        assert!(AccessControl::parse(bad_action).is_err());
        let twice = "kind: Configuration\nspec:\n  accessControl:\n    policies:\n    - appId: a\n    - app: a\n";
        assert!(AccessControl::parse(twice).unwrap_err().contains("two policies"));
    }
}
