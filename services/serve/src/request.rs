//! Parsing a `predict` request: `{"features": [x, ...]}` or `{"features": [[x, ...], ...]}`.
//! Every problem is an INVALID_ARGUMENT whose message names the sample and feature.

use serde::Deserialize;
use serde_json::Value;
use tandem_sdk::Status;

/// Most samples one request may carry.
pub const MAX_SAMPLES: usize = 10_000;

/// The samples of a request body, each a row of finite `f32`, all rows of one width.
pub fn parse(body: &[u8]) -> Result<Vec<Vec<f32>>, Status> {
    match parse_well_formed(body) {
        Some(samples) => Ok(samples),
        None => parse_checked(body),
    }
}

#[derive(Deserialize)]
struct OneSample {
    features: Vec<f64>,
}

#[derive(Deserialize)]
struct SeveralSamples {
    features: Vec<Vec<f64>>,
}

/// A well-formed request, read straight into numbers (the hot path: no `Value` tree per
/// request); `None` for anything else, which [`parse_checked`] reads again to name the problem.
fn parse_well_formed(body: &[u8]) -> Option<Vec<Vec<f32>>> {
    let rows = match serde_json::from_slice::<OneSample>(body) {
        Ok(one) => vec![one.features],
        Err(_) => serde_json::from_slice::<SeveralSamples>(body).ok()?.features,
    };
    let width = rows.first()?.len();
    if width == 0 || rows.len() > MAX_SAMPLES {
        return None;
    }
    rows.into_iter()
        .map(|row| {
            if row.len() != width {
                return None;
            }
            row.into_iter().map(|x| Some(x as f32).filter(|x| x.is_finite())).collect()
        })
        .collect()
}

/// [`parse`] through a JSON `Value`, so that every problem can be named.
fn parse_checked(body: &[u8]) -> Result<Vec<Vec<f32>>, Status> {
    let invalid = |message: String| Status::invalid_argument(message);
    let value: Value =
        serde_json::from_slice(body).map_err(|e| invalid(format!("the predict request is not valid JSON: {e}")))?;
    let features = value.get("features").ok_or_else(|| {
        invalid("the predict request has no 'features' field (expected {\"features\": [..]})".to_string())
    })?;
    let Value::Array(items) = features else {
        return Err(invalid(
            "'features' must be an array of numbers (one sample) or of arrays (several samples)".to_string(),
        ));
    };
    let rows: Vec<&Vec<Value>> = if items.iter().all(Value::is_array) && !items.is_empty() {
        items.iter().map(|item| item.as_array().expect("checked")).collect()
    } else if items.iter().any(Value::is_array) {
        return Err(invalid(
            "'features' mixes numbers and arrays: give one sample [x, ..] or samples [[x, ..], ..]".to_string(),
        ));
    } else {
        vec![items]
    };
    if rows.len() > MAX_SAMPLES {
        return Err(invalid(format!("{} samples in one request; at most {MAX_SAMPLES}", rows.len())));
    }
    let width = rows[0].len();
    let mut samples = Vec::with_capacity(rows.len());
    for (sample, row) in rows.iter().enumerate() {
        if row.is_empty() {
            return Err(invalid(format!("sample {sample} has no features")));
        }
        if row.len() != width {
            return Err(invalid(format!(
                "sample {sample} has {} features but sample 0 has {width}: every sample needs the same count",
                row.len()
            )));
        }
        let mut values = Vec::with_capacity(width);
        for (feature, value) in row.iter().enumerate() {
            values.push(
                number(value).map_err(|problem| invalid(format!("sample {sample}, feature {feature}: {problem}")))?,
            );
        }
        samples.push(values);
    }
    Ok(samples)
}

fn number(value: &Value) -> Result<f32, String> {
    match value {
        Value::Number(n) => {
            let x = n.as_f64().ok_or_else(|| format!("{n} is not a number"))?;
            let single = x as f32;
            if single.is_finite() {
                Ok(single)
            } else {
                Err(format!("{n} is not a finite number (beyond the f32 range)"))
            }
        }
        Value::String(text)
            if matches!(
                text.to_ascii_lowercase().as_str(),
                "nan" | "inf" | "-inf" | "infinity" | "-infinity" | "+infinity" | "+inf"
            ) =>
        {
            Err(format!("{text} is not a finite number"))
        }
        other => Err(format!("{other} is not a number")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_sdk::Code;

    fn err(body: &str) -> String {
        let status = parse(body.as_bytes()).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{body}: {status:?}");
        status.message().to_string()
    }

    #[test]
    fn one_sample_or_many() {
        assert_eq!(parse(br#"{"features":[1,2.5]}"#).unwrap(), vec![vec![1.0, 2.5]]);
        assert_eq!(parse(br#"{"features":[[1],[2]]}"#).unwrap(), vec![vec![1.0], vec![2.0]]);
    }

    #[test]
    fn the_hot_path_reads_what_the_checked_parse_reads_and_leaves_it_the_problems() {
        for body in [
            r#"{"features":[1,2.5,-3e2]}"#,
            r#"{"features":[[1,2],[3,4.25]]}"#,
            r#"{"other":true,"features":[0]}"#,
            r#"{"features":[[7]]}"#,
        ] {
            let fast = parse_well_formed(body.as_bytes()).unwrap_or_else(|| panic!("{body}: not read"));
            assert_eq!(fast, parse_checked(body.as_bytes()).unwrap(), "{body}");
        }
        for body in [
            r#"{"features":[1,"NaN"]}"#,
            r#"{"features":[[1],[1e39]]}"#,
            r#"{"features":[[1,2],[1]]}"#,
            r#"{"features":[]}"#,
            r#"{"features":[[]]}"#,
            r#"{"features":[1,[2]]}"#,
            r#"{"values":[1]}"#,
            "not json",
        ] {
            assert!(parse_well_formed(body.as_bytes()).is_none(), "{body}");
            assert!(parse(body.as_bytes()).is_err(), "{body}");
        }
    }

    #[test]
    fn problems_are_named() {
        assert!(err(r#"{"features":[1,"NaN"]}"#).contains("sample 0, feature 1: NaN is not a finite number"));
        assert!(err(r#"{"features":[[1],[1e39]]}"#).contains("sample 1, feature 0"));
        assert!(err(r#"{"features":[[1,2],[1]]}"#).contains("sample 1 has 1 features"));
        assert!(err(r#"{"features":[]}"#).contains("no features"));
        assert!(err(r#"{"features":[1,"x"]}"#).contains("\"x\" is not a number"));
        assert!(err(r#"{"values":[1]}"#).contains("no 'features' field"));
        assert!(err(r#"{"features":[1,[2]]}"#).contains("mixes"));
        assert!(err("not json").contains("not valid JSON"));
    }
}
