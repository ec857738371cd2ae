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

/// Makes sure Python's `duckdb` package (the baseline of `bench activation` and `bench sql`)
/// can be imported, installing it with pip if it is missing.
pub(crate) fn ensure_duckdb() -> Result<(), String> {
    let imports = || {
        std::process::Command::new("python3")
            .args(["-c", "import duckdb"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if imports() {
        return Ok(());
    }
    let installed = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "duckdb"])
        .status()
        .is_ok_and(|s| s.success());
    if installed && imports() {
        Ok(())
    } else {
        Err("the duckdb Python package is not installable here".into())
    }
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
