//! The table every benchmark prints (Markdown, so it can go straight into the README).

/// One row: what was measured, its value, and the baseline it is compared with.
pub(crate) struct Row {
    /// What was measured.
    pub(crate) measure: String,
    /// Our value, formatted.
    pub(crate) ours: String,
    /// The baseline's value, formatted (empty if none).
    pub(crate) baseline: String,
    /// ours / baseline, when both are rates.
    pub(crate) ratio: Option<f64>,
}

/// Prints rows as a Markdown table under a title.
pub(crate) fn print_table(title: &str, baseline_name: &str, rows: &[Row]) {
    println!("\n### {title}\n");
    println!("| measure | northstar | {baseline_name} | ratio |");
    println!("|---|---:|---:|---:|");
    for row in rows {
        let ratio = row.ratio.map(|r| format!("{r:.2}×")).unwrap_or_default();
        println!(
            "| {} | {} | {} | {ratio} |",
            row.measure, row.ours, row.baseline
        );
    }
    println!();
}

/// `123,456` style thousands.
pub(crate) fn thousands(value: f64) -> String {
    let rounded = value.round() as u64;
    let digits = rounded.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Bytes as MiB with one decimal.
pub(crate) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(999.0), "999");
    }
}
