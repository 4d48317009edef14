//! `--data` / `--data-file`: a JSON payload, checked before anything is sent.

use std::io::Read;

use crate::args::DataArgs;
use crate::error::CliError;

/// The content type of every payload the CLI sends.
pub const JSON: &str = "application/json";

/// The payload's bytes, after checking that they are JSON; `None` when neither flag was given.
pub fn read(args: &DataArgs) -> Result<Option<Vec<u8>>, CliError> {
    let (text, source) = match (&args.data, &args.data_file) {
        (Some(data), _) => (data.clone(), "--data".to_string()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::usage(format!("--data-file -: cannot read stdin: {e}")))?;
            (text, "--data-file - (stdin)".to_string())
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::usage(format!("--data-file {}: {e}", path.display())))?;
            (text, format!("--data-file {}", path.display()))
        }
        (None, None) => return Ok(None),
    };
    check_json(&text, &source)?;
    Ok(Some(text.into_bytes()))
}

/// Refuses text that is not one JSON value, naming where it breaks.
pub fn check_json(text: &str, source: &str) -> Result<(), CliError> {
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .map(|_| ())
        .map_err(|e| CliError::usage(format!("{source} is not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(data: &str) -> DataArgs {
        DataArgs { data: Some(data.into()), data_file: None }
    }

    #[test]
    fn json_passes_unchanged() {
        assert_eq!(read(&inline(r#"{"features": [1, 2]}"#)).unwrap().unwrap(), br#"{"features": [1, 2]}"#);
        assert_eq!(read(&inline("3")).unwrap().unwrap(), b"3");
        assert!(read(&DataArgs { data: None, data_file: None }).unwrap().is_none());
    }

    #[test]
    fn malformed_json_is_refused_with_its_position() {
        let e = read(&inline(r#"{"features": [1, 2}"#)).unwrap_err();
        assert_eq!(e.kind, crate::ExitKind::Usage);
        assert!(e.message.starts_with("--data is not valid JSON:"), "{}", e.message);
        assert!(e.message.contains("column"), "{}", e.message);
        assert!(read(&inline("{} {}")).is_err(), "two values are not one payload");
        assert!(read(&inline("")).is_err());
    }

    #[test]
    fn a_missing_data_file_is_named() {
        let e = read(&DataArgs { data: None, data_file: Some("/nonexistent/x.json".into()) }).unwrap_err();
        assert!(e.message.contains("/nonexistent/x.json"), "{}", e.message);
    }
}
