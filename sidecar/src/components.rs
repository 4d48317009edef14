//! Components declared in Dapr-format YAML files (`apiVersion: dapr.io/v1alpha1`,
//! `kind: Component`) under `--resources-path`.
//!
//! Each `*.yaml`/`*.yml` file may hold several documents. Documents of other kinds
//! (Subscription, Configuration, ...) are skipped, as Dapr's resources folders mix them
//! (subscriptions are read by [`crate::pubsub::declared`]).
//! Anything malformed stops tandemd at start with a message naming the file and the field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub const API_VERSION: &str = "dapr.io/v1alpha1";

/// One declared component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentSpec {
    pub name: String,
    /// e.g. `state.sled`, `state.etcd`.
    pub kind: String,
    pub version: String,
    pub metadata: HashMap<String, String>,
    /// The file it came from, for error messages.
    pub file: PathBuf,
}

impl ComponentSpec {
    /// The building block: the part of the type before the first '.' (`state`, `pubsub`).
    pub fn block(&self) -> &str {
        self.kind.split('.').next().unwrap_or_default()
    }

    pub fn metadata(&self, name: &str) -> Option<&str> {
        self.metadata.get(name).map(String::as_str)
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    api_version: Option<String>,
    metadata: Option<DocumentMetadata>,
    spec: Option<Spec>,
}

#[derive(Debug, Deserialize)]
struct DocumentMetadata {
    name: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Spec {
    #[serde(rename = "type")]
    kind: Option<String>,
    version: Option<String>,
    #[serde(default)]
    metadata: Vec<MetadataItem>,
}

#[derive(Debug, Deserialize)]
struct MetadataItem {
    name: Option<String>,
    value: Option<serde_json::Value>,
}

/// The YAML files under `dir` (`*.yaml`, `*.yml`), sorted by name, with their text. A missing
/// `dir` is an error: the flag was given for a reason.
pub fn resource_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("--resources-path {}: {e}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            Ok((file, text))
        })
        .collect()
}

/// The documents of one YAML file, each as generic JSON (a `---`-separated stream; empty
/// documents are `None`).
pub fn documents(text: &str, file: &Path) -> Result<Vec<Option<serde_json::Value>>, String> {
    serde_saphyr::from_multiple(text).map_err(|e| format!("{}: not valid YAML for a resource: {e}", file.display()))
}

/// Reads every component under `dir`, sorted by file name.
pub fn load_dir(dir: &Path) -> Result<Vec<ComponentSpec>, String> {
    let mut components = Vec::new();
    for (file, text) in resource_files(dir)? {
        components.extend(parse(&text, &file)?);
    }
    let mut seen = HashMap::new();
    for component in &components {
        if let Some(first) = seen.insert(component.name.clone(), component.file.clone()) {
            return Err(format!(
                "{}: component name '{}' is already declared in {}",
                component.file.display(),
                component.name,
                first.display()
            ));
        }
    }
    Ok(components)
}

/// Parses the documents of one file.
pub fn parse(text: &str, file: &Path) -> Result<Vec<ComponentSpec>, String> {
    let at = |what: String| format!("{}: {what}", file.display());
    let mut components = Vec::new();
    for (index, document) in documents(text, file)?.into_iter().enumerate() {
        let Some(document) = document else { continue };
        let at = |field: &str, what: &str| at(format!("document {}: {field} {what}", index + 1));
        // Other kinds (Subscription, Configuration, ...) have other shapes: only the kind is read.
        match document.get("kind").and_then(|k| k.as_str()) {
            Some("Component") => {}
            Some(_) => continue,
            None => return Err(at("kind", "is missing (want Component)")),
        }
        let document: Document =
            serde_json::from_value(document).map_err(|e| at("the component", &format!("is malformed: {e}")))?;
        match document.api_version.as_deref() {
            Some(API_VERSION) => {}
            Some(other) => return Err(at("apiVersion", &format!("is '{other}', want '{API_VERSION}'"))),
            None => return Err(at("apiVersion", &format!("is missing (want '{API_VERSION}')"))),
        }
        let name = document
            .metadata
            .and_then(|m| m.name)
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| at("metadata.name", "is missing"))?;
        crate::config::validate_name("metadata.name", &name)
            .map_err(|e| at("metadata.name", &format!("is invalid: {e}")))?;
        let spec = document.spec.ok_or_else(|| at("spec", "is missing"))?;
        let kind = spec.kind.filter(|k| !k.trim().is_empty()).ok_or_else(|| at("spec.type", "is missing"))?;
        let mut metadata = HashMap::new();
        for (i, item) in spec.metadata.into_iter().enumerate() {
            let field = format!("spec.metadata[{i}]");
            let key = item.name.filter(|n| !n.is_empty()).ok_or_else(|| at(&format!("{field}.name"), "is missing"))?;
            let value = match item.value {
                Some(serde_json::Value::String(s)) => s,
                Some(serde_json::Value::Number(n)) => n.to_string(),
                Some(serde_json::Value::Bool(b)) => b.to_string(),
                Some(serde_json::Value::Null) | None => String::new(),
                Some(_) => return Err(at(&format!("{field}.value"), "must be a string, number or boolean")),
            };
            if metadata.insert(key.clone(), value).is_some() {
                return Err(at(&format!("{field}.name"), &format!("'{key}' is given twice")));
            }
        }
        components.push(ComponentSpec {
            name,
            kind,
            version: spec.version.unwrap_or_else(|| "v1".into()),
            metadata,
            file: file.to_path_buf(),
        });
    }
    Ok(components)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<ComponentSpec>, String> {
        parse(text, Path::new("components/x.yaml"))
    }

    #[test]
    fn a_dapr_component_file_parses_with_several_documents() {
        let text = "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: shared\nspec:\n  type: state.etcd\n  version: v1\n  metadata:\n  - name: keyPrefix\n    value: name\n  - name: ttl\n    value: 3\n---\napiVersion: dapr.io/v2alpha1\nkind: Subscription\nmetadata:\n  name: sub\nspec:\n  topic: t\n  metadata:\n    rawPayload: \"true\"\n---\napiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: local\nspec:\n  type: state.sled\n";
        let components = parse_str(text).unwrap();
        assert_eq!(components.len(), 2);
        assert_eq!(components[0].name, "shared");
        assert_eq!(components[0].kind, "state.etcd");
        assert_eq!(components[0].block(), "state");
        assert_eq!(components[0].metadata("keyPrefix"), Some("name"));
        assert_eq!(components[0].metadata("ttl"), Some("3"));
        assert_eq!(components[1].name, "local");
        assert_eq!(components[1].version, "v1");
    }

    #[test]
    fn malformed_files_name_the_file_and_the_field() {
        let cases = [
            ("kind: Component\nmetadata:\n  name: a\nspec:\n  type: state.sled\n", "apiVersion is missing"),
            ("apiVersion: dapr.io/v1alpha1\nkind: Component\nspec:\n  type: state.sled\n", "metadata.name is missing"),
            ("apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: a\n", "spec is missing"),
            (
                "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: a\nspec:\n  version: v1\n",
                "spec.type is missing",
            ),
            (
                "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: a\nspec:\n  type: state.sled\n  metadata:\n  - value: x\n",
                "spec.metadata[0].name is missing",
            ),
            (
                "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: a/b\nspec:\n  type: state.sled\n",
                "metadata.name is invalid",
            ),
            ("apiVersion: [unclosed\n", "not valid YAML"),
            ("kind: Component\napiVersion: dapr.io/v1alpha1\nmetadata: [1]\n", "the component is malformed"),
        ];
        for (text, expected) in cases {
            let err = parse_str(text).unwrap_err();
            assert!(err.starts_with("components/x.yaml: "), "{err}");
            assert!(err.contains(expected), "expected '{expected}' in: {err}");
        }
    }

    #[test]
    fn a_directory_is_read_in_order_and_duplicate_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let doc = |name: &str| {
            format!(
                "apiVersion: dapr.io/v1alpha1\nkind: Component\nmetadata:\n  name: {name}\nspec:\n  type: state.sled\n"
            )
        };
        std::fs::write(dir.path().join("b.yaml"), doc("two")).unwrap();
        std::fs::write(dir.path().join("a.yml"), doc("one")).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a component").unwrap();
        let names: Vec<String> = load_dir(dir.path()).unwrap().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["one", "two"]);

        std::fs::write(dir.path().join("c.yaml"), doc("one")).unwrap();
        let err = load_dir(dir.path()).unwrap_err();
        assert!(err.contains("c.yaml") && err.contains("'one'") && err.contains("a.yml"), "{err}");
        assert!(load_dir(&dir.path().join("missing")).unwrap_err().contains("--resources-path"));
    }
}
