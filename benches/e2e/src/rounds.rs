//! Alternated rounds (`--sweep-rounds`, `--senders-rounds`): each system
//! runs several times, the systems taking turns, so that a slow stretch of
//! this shared machine slows every system alike. A system is reported by
//! its median round by CPU per sample; every round is listed beside it, one
//! table cell holding a value of each round.

/// The index of the median of `values` (the lower one of an even count).
pub fn median_index(values: &[f64]) -> usize {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    order[(values.len() - 1) / 2]
}

/// One table cell: `f` of every round that has a value, " / " between them.
pub fn cell<T>(runs: &[T], f: impl Fn(usize, &T) -> Option<String>) -> String {
    runs.iter()
        .enumerate()
        .filter_map(|(i, t)| f(i, t))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// " (round N)" for the progress lines, when there is more than one.
pub fn suffix(round: u32, rounds: u32) -> String {
    if rounds > 1 {
        format!(" (round {round})")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_round_is_the_middle_one_by_value() {
        assert_eq!(median_index(&[0.4]), 0);
        assert_eq!(median_index(&[0.45, 0.37, 0.40]), 2);
        assert_eq!(median_index(&[0.45, 0.37, 0.40, 0.38]), 3);
    }

    #[test]
    fn a_cell_joins_the_rounds_that_have_a_value() {
        assert_eq!(cell(&[1, 2, 3], |_, v| Some(v.to_string())), "1 / 2 / 3");
        assert_eq!(
            cell(&[1, 2, 3], |i, v| (i != 1).then(|| v.to_string())),
            "1 / 3"
        );
    }
}
