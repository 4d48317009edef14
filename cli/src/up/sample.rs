//! A sample to put in the ready-to-paste `predict` example.

/// The first image of the digits dataset (8x8 pixels, values 0 to 16): a handwritten 0.
pub const DIGIT_ZERO: [u8; 64] = [
    0, 0, 5, 13, 9, 1, 0, 0, //
    0, 0, 13, 15, 10, 15, 5, 0, //
    0, 3, 15, 2, 0, 11, 8, 0, //
    0, 4, 12, 0, 0, 8, 8, 0, //
    0, 5, 8, 0, 0, 9, 8, 0, //
    0, 4, 11, 0, 1, 12, 7, 0, //
    0, 2, 14, 5, 10, 12, 0, 0, //
    0, 0, 6, 13, 10, 0, 0, 0, //
];

/// `{"features":[...]}` for a model with `feature_count` features: the digit above when the
/// dataset is digits, else zeros (a placeholder the user replaces with real values).
pub fn predict_request(digits: bool, feature_count: usize) -> String {
    let features: Vec<String> = if digits && feature_count == DIGIT_ZERO.len() {
        DIGIT_ZERO.iter().map(u8::to_string).collect()
    } else {
        vec!["0".to_string(); feature_count]
    };
    format!("{{\"features\":[{}]}}", features.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_json_with_one_value_per_feature() {
        let request: serde_json::Value = serde_json::from_str(&predict_request(true, 64)).unwrap();
        assert_eq!(request["features"].as_array().unwrap().len(), 64);
        assert_eq!(request["features"][2], 5);
        let request: serde_json::Value = serde_json::from_str(&predict_request(false, 3)).unwrap();
        assert_eq!(request["features"], serde_json::json!([0, 0, 0]));
    }
}
