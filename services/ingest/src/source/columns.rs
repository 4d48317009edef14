//! Arrow record batches to rows: which column is the label and which are features, and every
//! value converted and checked (present, a finite number, a class index), so a bad value is
//! named by its row and column before anything is published.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, Schema};

use super::Chunk;

/// The label column and the feature columns of a table, by position.
#[derive(Debug, Clone)]
pub struct Layout {
    label: usize,
    features: Vec<usize>,
    names: Vec<String>,
}

/// A value that cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub struct BadValue {
    /// The source's 0-based row index.
    pub row: u64,
    pub column: String,
    pub problem: String,
}

impl Layout {
    /// The layout of a table whose columns carry types (Parquet): the label column holds
    /// integers (or whole floats), every other column is a numeric feature.
    pub fn typed(schema: &Schema, label_column: &str) -> Result<Layout, String> {
        let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        let layout = Layout::of(names, label_column)?;
        let label_type = schema.field(layout.label).data_type();
        if !(label_type.is_integer() || label_type.is_floating()) {
            return Err(format!(
                "the label column '{label_column}' holds {label_type} values, not class indices (integers >= 0)"
            ));
        }
        for &index in &layout.features {
            let field = schema.field(index);
            if !field.data_type().is_numeric() {
                return Err(format!(
                    "column '{}' holds {} values, not numbers: every column but the label '{label_column}' is a feature",
                    field.name(),
                    field.data_type()
                ));
            }
        }
        Ok(layout)
    }

    /// The layout of a table of text columns (CSV), every value parsed when read.
    pub fn text(names: Vec<String>, label_column: &str) -> Result<Layout, String> {
        Layout::of(names, label_column)
    }

    fn of(names: Vec<String>, label_column: &str) -> Result<Layout, String> {
        let labels: Vec<usize> = (0..names.len()).filter(|&i| names[i] == label_column).collect();
        let label = match labels.as_slice() {
            [label] => *label,
            found => {
                let problem = if found.is_empty() { "no" } else { "more than one" };
                return Err(format!("{problem} label column '{label_column}' (columns: {})", names.join(", ")));
            }
        };
        let features: Vec<usize> = (0..names.len()).filter(|&i| i != label).collect();
        if features.is_empty() {
            return Err(format!("no feature columns besides the label column '{label_column}'"));
        }
        Ok(Layout { label, features, names })
    }

    pub fn feature_names(&self) -> Vec<String> {
        self.features.iter().map(|&i| self.names[i].clone()).collect()
    }

    /// The rows of `batch`, whose first row is the source's row `first_row`.
    pub fn chunk(&self, batch: &RecordBatch, first_row: u64) -> Result<Chunk, BadValue> {
        let rows = batch.num_rows();
        let width = self.features.len();
        let bad = |row: usize, column: usize, problem: String| BadValue {
            row: first_row + row as u64,
            column: self.names[column].clone(),
            problem,
        };
        let mut features = vec![0f32; rows * width];
        for (position, &column) in self.features.iter().enumerate() {
            let values = feature_values(batch.column(column)).map_err(|(row, problem)| bad(row, column, problem))?;
            for (row, value) in values.into_iter().enumerate() {
                features[row * width + position] = value;
            }
        }
        let labels = label_values(batch.column(self.label)).map_err(|(row, problem)| bad(row, self.label, problem))?;
        Ok(Chunk { first_row, features, labels })
    }
}

/// A column's values as finite `f32`s, or the first bad one (its row in the batch, the problem).
fn feature_values(array: &ArrayRef) -> Result<Vec<f32>, (usize, String)> {
    let mut values = Vec::with_capacity(array.len());
    if let Some(text) = array.as_string_opt::<i32>() {
        for (row, field) in text.iter().enumerate() {
            let field = field.map(str::trim).filter(|f| !f.is_empty()).ok_or((row, "no value".to_string()))?;
            match field.parse::<f32>() {
                Ok(value) if value.is_finite() => values.push(value),
                _ => return Err((row, format!("'{field}' is not a finite number"))),
            }
        }
        return Ok(values);
    }
    let cast =
        arrow_cast::cast(array, &DataType::Float32).map_err(|e| (0, format!("cannot be read as numbers: {e}")))?;
    let floats = cast.as_primitive::<Float32Type>();
    for row in 0..floats.len() {
        if array.is_null(row) {
            return Err((row, "no value (null)".into()));
        }
        let value = floats.value(row);
        if !value.is_finite() {
            return Err((row, format!("{value} is not a finite number (as f32)")));
        }
        values.push(value);
    }
    Ok(values)
}

/// A label column's values as class indices, or the first bad one.
fn label_values(array: &ArrayRef) -> Result<Vec<u32>, (usize, String)> {
    let not_a_class = |shown: &dyn std::fmt::Display| format!("label {shown} is not a class index (an integer >= 0)");
    let mut labels = Vec::with_capacity(array.len());
    if let Some(text) = array.as_string_opt::<i32>() {
        for (row, field) in text.iter().enumerate() {
            let field = field.map(str::trim).filter(|f| !f.is_empty()).ok_or((row, "no label".to_string()))?;
            labels.push(field.parse::<u32>().map_err(|_| (row, not_a_class(&format!("'{field}'"))))?);
        }
        return Ok(labels);
    }
    let cast =
        arrow_cast::cast(array, &DataType::Float64).map_err(|e| (0, format!("cannot be read as labels: {e}")))?;
    let floats = cast.as_primitive::<Float64Type>();
    for row in 0..floats.len() {
        if array.is_null(row) {
            return Err((row, "no label (null)".into()));
        }
        let value = floats.value(row);
        if !(value >= 0.0 && value.fract() == 0.0 && value <= f64::from(u32::MAX)) {
            return Err((row, not_a_class(&value)));
        }
        labels.push(value as u32);
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Float64Array, Int64Array, StringArray};
    use arrow_schema::Field;

    use super::*;

    fn table(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(columns.into_iter().map(|(n, a)| (n.to_string(), a))).unwrap()
    }

    #[test]
    fn typed_columns_become_rows_and_bad_values_are_named() {
        let good = table(vec![
            ("a", Arc::new(Float64Array::from(vec![1.5, 2.5])) as ArrayRef),
            ("label", Arc::new(Int64Array::from(vec![3, 0]))),
            ("b", Arc::new(Int64Array::from(vec![7, 8]))),
        ]);
        let layout = Layout::typed(&good.schema(), "label").unwrap();
        assert_eq!(layout.feature_names(), ["a", "b"]);
        let chunk = layout.chunk(&good, 10).unwrap();
        assert_eq!((chunk.features, chunk.labels, chunk.first_row), (vec![1.5, 7.0, 2.5, 8.0], vec![3, 0], 10));

        let null = table(vec![
            ("a", Arc::new(Float64Array::from(vec![Some(1.0), None])) as ArrayRef),
            ("label", Arc::new(Int64Array::from(vec![1, 2]))),
        ]);
        let err = Layout::typed(&null.schema(), "label").unwrap().chunk(&null, 100).unwrap_err();
        assert_eq!(err, BadValue { row: 101, column: "a".into(), problem: "no value (null)".into() });
        let negative = table(vec![
            ("a", Arc::new(Float64Array::from(vec![1.0])) as ArrayRef),
            ("label", Arc::new(Int64Array::from(vec![-1]))),
        ]);
        let err = Layout::typed(&negative.schema(), "label").unwrap().chunk(&negative, 0).unwrap_err();
        assert_eq!(
            (err.column.as_str(), err.problem.as_str()),
            ("label", "label -1 is not a class index (an integer >= 0)")
        );
        let nan = table(vec![
            ("a", Arc::new(Float64Array::from(vec![f64::NAN])) as ArrayRef),
            ("label", Arc::new(Int64Array::from(vec![1]))),
        ]);
        let err = Layout::typed(&nan.schema(), "label").unwrap().chunk(&nan, 0).unwrap_err();
        assert!(err.problem.contains("not a finite number"), "{err:?}");
    }

    #[test]
    fn unusable_schemas_are_refused_naming_the_column() {
        let schema = |fields: Vec<Field>| Schema::new(fields);
        let err = Layout::typed(&schema(vec![Field::new("a", DataType::Float32, false)]), "label").unwrap_err();
        assert_eq!(err, "no label column 'label' (columns: a)");
        let text_label =
            schema(vec![Field::new("a", DataType::Float32, false), Field::new("y", DataType::Utf8, false)]);
        let err = Layout::typed(&text_label, "y").unwrap_err();
        assert!(err.contains("the label column 'y' holds Utf8 values"), "{err}");
        let text_feature =
            schema(vec![Field::new("name", DataType::Utf8, false), Field::new("label", DataType::Int32, false)]);
        let err = Layout::typed(&text_feature, "label").unwrap_err();
        assert!(err.starts_with("column 'name' holds Utf8 values, not numbers"), "{err}");
        let only_label = schema(vec![Field::new("label", DataType::Int32, false)]);
        assert!(Layout::typed(&only_label, "label").unwrap_err().contains("no feature columns"));
    }

    #[test]
    fn text_columns_are_parsed_and_bad_fields_named() {
        let text = |values: Vec<Option<&str>>| Arc::new(StringArray::from(values)) as ArrayRef;
        let layout = Layout::text(vec!["x".into(), "label".into()], "label").unwrap();
        let good =
            table(vec![("x", text(vec![Some(" 1.5"), Some("-2")])), ("label", text(vec![Some("1"), Some("0")]))]);
        let chunk = layout.chunk(&good, 0).unwrap();
        assert_eq!((chunk.features, chunk.labels), (vec![1.5, -2.0], vec![1, 0]));
        let bad = table(vec![("x", text(vec![Some("1"), Some("abc")])), ("label", text(vec![Some("1"), Some("0")]))]);
        let err = layout.chunk(&bad, 5).unwrap_err();
        assert_eq!(err, BadValue { row: 6, column: "x".into(), problem: "'abc' is not a finite number".into() });
        let empty = table(vec![("x", text(vec![Some("1")])), ("label", text(vec![None]))]);
        assert_eq!(layout.chunk(&empty, 0).unwrap_err().problem, "no label");
        let fraction = table(vec![("x", text(vec![Some("1")])), ("label", text(vec![Some("1.5")]))]);
        assert!(layout.chunk(&fraction, 0).unwrap_err().problem.contains("'1.5' is not a class index"));
    }
}
