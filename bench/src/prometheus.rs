//! Reading tandemd's `/metrics` (Prometheus text exposition).

/// The sum of metric `name`'s samples over all its label sets (an unlabelled metric has one);
/// 0 when absent. `NAME_count` and `NAME_sum` read a histogram.
pub fn sum_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|line| line.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|line| line.rsplit(' ').next()?.trim().parse::<f64>().ok())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_add_up_over_label_sets_and_other_names_do_not_count() {
        let text = "# HELP tandem_pubsub_delivery_batch_size Events per delivery call\n\
                    tandem_pubsub_delivery_batch_size_sum{topic=\"a\"} 640.0\n\
                    tandem_pubsub_delivery_batch_size_count{topic=\"a\"} 10\n\
                    tandem_pubsub_delivery_batch_size_bucket{topic=\"a\",le=\"64.0\"} 10\n\
                    tandem_pubsub_delivery_batch_size_sum{topic=\"b\"} 6.0\n\
                    tandem_pubsub_delivery_batch_size_count{topic=\"b\"} 3\n\
                    tandem_pubsub_delivery_batch_size_counter 99\n\
                    tandem_trace_spans_exported_total 42\n";
        assert_eq!(sum_of(text, "tandem_pubsub_delivery_batch_size_count"), 13.0);
        assert_eq!(sum_of(text, "tandem_pubsub_delivery_batch_size_sum"), 646.0);
        assert_eq!(sum_of(text, "tandem_trace_spans_exported_total"), 42.0);
        assert_eq!(sum_of(text, "tandem_trace_spans_dropped_total"), 0.0);
    }
}
