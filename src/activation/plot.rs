//! SVG pictures of an activation analysis, written as plain strings (no plotting crates).
//!
//! - [`phi_heatmap`]: phi over the (times × days) grid, diverging blue → white → red, the chosen
//!   cell outlined, guarded-out cells hatched;
//! - [`retention_chart`]: retention above vs below the threshold against `times` for one `days`;
//! - [`report_svg`]: both, stacked under a header naming the event and the choice.
//!
//! Every document is standalone SVG 1.1 (`xmlns` set) and every piece of text is XML-escaped.

use std::fmt::Write as _;

use super::stats::{Candidate, Evaluation, percent_tenths};

/// Width of every chart, so the stacked report lines up.
const WIDTH: f64 = 760.0;
/// Room left of a plot for the y axis labels.
const LEFT: f64 = 90.0;
/// Room above a plot for its title.
const TOP: f64 = 50.0;
/// Largest plot area of the heatmap; cells shrink to fit bigger grids.
const HEAT_MAX_W: f64 = 560.0;
const HEAT_MAX_H: f64 = 420.0;
/// Biggest cell, so that a small grid does not become a few giant squares.
const CELL_MAX_W: f64 = 56.0;
const CELL_MAX_H: f64 = 32.0;
/// Line chart plot area.
const LINE_W: f64 = 520.0;
const LINE_H: f64 = 240.0;
const FONT: &str = "font-family=\"Helvetica, Arial, sans-serif\"";
const ABOVE_COLOUR: &str = "#b2182b";
const BELOW_COLOUR: &str = "#2166ac";

/// A drawn piece of a picture plus its size, so pieces can be stacked.
struct Fragment {
    body: String,
    height: f64,
}

/// Escape text for XML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            _ => out.push(ch),
        }
    }
    out
}

/// Wrap drawn pieces in a standalone SVG document.
fn document(body: &str, height: f64) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\">\n<rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>\n{body}</svg>\n"
    )
}

/// The attributes of a bold line of `content` at `size` that keep it within the picture: a
/// line wider than the picture (a long event name and as-of time) is drawn narrower.
fn fitted(content: &str, size: u32) -> String {
    // A bold sans-serif character is about 0.62 of the font size wide on average.
    let room = WIDTH - 40.0;
    let wide = content.chars().count() as f64 * f64::from(size) * 0.62;
    if wide > room {
        format!("font-weight=\"bold\" textLength=\"{room:.0}\" lengthAdjust=\"spacingAndGlyphs\"")
    } else {
        "font-weight=\"bold\"".to_string()
    }
}

/// One `<text>` element with escaped content.
fn text(x: f64, y: f64, size: u32, anchor: &str, extra: &str, content: &str) -> String {
    format!(
        "<text x=\"{x:.1}\" y=\"{y:.1}\" font-size=\"{size}\" text-anchor=\"{anchor}\" {FONT} {extra}>{}</text>\n",
        escape(content)
    )
}

/// Linear blend of two channels, for the colour scale.
fn blend(from: u8, to: u8, t: f64) -> u8 {
    (from as f64 + (to as f64 - from as f64) * t)
        .round()
        .clamp(0.0, 255.0) as u8
}

/// Diverging colour: blue for negative, white for 0, red for positive, saturating at ±`limit`.
fn phi_colour(phi: f64, limit: f64) -> String {
    let t = (phi / limit).clamp(-1.0, 1.0);
    let (r, g, b) = if t >= 0.0 {
        (178, 24, 43)
    } else {
        (33, 102, 172)
    };
    let t = t.abs();
    format!(
        "#{:02x}{:02x}{:02x}",
        blend(255, r, t),
        blend(255, g, t),
        blend(255, b, t)
    )
}

/// Scale limit: the largest |phi| rounded up to a tenth, at least 0.1, so colours use the range.
fn colour_limit(candidates: &[Candidate]) -> f64 {
    let max = candidates
        .iter()
        .filter_map(|c| c.phi)
        .fold(0.0f64, |m, p| m.max(p.abs()));
    ((max * 10.0).ceil() / 10.0).clamp(0.1, 1.0)
}

/// Sorted distinct values of one grid axis.
fn axis_values(candidates: &[Candidate], key: fn(&Candidate) -> u32) -> Vec<u32> {
    let mut values: Vec<u32> = candidates.iter().map(key).collect();
    values.sort_unstable();
    values.dedup();
    values
}

/// Geometry of the heatmap grid, computed once and shared by the drawing helpers.
struct Grid {
    times: Vec<u32>,
    days: Vec<u32>,
    cell_w: f64,
    cell_h: f64,
    left: f64,
    top: f64,
}

impl Grid {
    fn new(candidates: &[Candidate], top: f64) -> Self {
        let times = axis_values(candidates, |c| c.times);
        let days = axis_values(candidates, |c| c.days);
        let cell_w = (HEAT_MAX_W / times.len().max(1) as f64).min(CELL_MAX_W);
        let cell_h = (HEAT_MAX_H / days.len().max(1) as f64).min(CELL_MAX_H);
        Self {
            times,
            days,
            cell_w,
            cell_h,
            left: LEFT,
            top,
        }
    }

    fn width(&self) -> f64 {
        self.cell_w * self.times.len() as f64
    }

    fn height(&self) -> f64 {
        self.cell_h * self.days.len() as f64
    }

    /// Top-left corner of a candidate's cell; days grow upwards like a y axis.
    fn position(&self, times: u32, days: u32) -> Option<(f64, f64)> {
        let column = self.times.iter().position(|&t| t == times)?;
        let row = self.days.iter().position(|&d| d == days)?;
        let x = self.left + column as f64 * self.cell_w;
        let y = self.top + (self.days.len() - 1 - row) as f64 * self.cell_h;
        Some((x, y))
    }

    fn labels_fit(&self) -> bool {
        self.cell_w >= 30.0 && self.cell_h >= 14.0
    }
}

/// Fill of a cell whose phi is undefined (a row or column of its table is empty).
const NO_DATA: &str = "#d9d9d9";

/// Hatch pattern for guarded-out cells.
fn hatch_defs() -> String {
    "<defs><pattern id=\"ns-hatch\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" \
     patternTransform=\"rotate(45)\"><line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#555555\" \
     stroke-width=\"1.5\" stroke-opacity=\"0.6\"/></pattern></defs>\n"
        .to_string()
}

/// One heatmap cell: fill, hatch if guarded out, optional phi label, and a tooltip.
fn heat_cell(grid: &Grid, candidate: &Candidate, limit: f64) -> String {
    let Some((x, y)) = grid.position(candidate.times, candidate.days) else {
        return String::new();
    };
    let (w, h) = (grid.cell_w, grid.cell_h);
    let fill = candidate
        .phi
        .map_or_else(|| NO_DATA.to_string(), |p| phi_colour(p, limit));
    let tip = match candidate.phi {
        Some(p) => format!(
            "at least {} times in {} days: phi {p:.3}",
            candidate.times, candidate.days
        ),
        None => format!(
            "at least {} times in {} days: phi undefined",
            candidate.times, candidate.days
        ),
    };
    let mut out = format!(
        "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" fill=\"{fill}\" \
         stroke=\"#ffffff\" stroke-width=\"0.5\"><title>{}</title></rect>\n",
        escape(&tip)
    );
    // Hatched: the cell has data and fails a guard. A cell without data (phi undefined) is
    // plain grey, so "nothing to judge" never reads as "judged and refused".
    if !candidate.passes_guards && candidate.phi.is_some() {
        let _ = writeln!(
            out,
            "<rect class=\"guarded\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{w:.1}\" height=\"{h:.1}\" \
             fill=\"url(#ns-hatch)\"/>"
        );
    }
    if grid.labels_fit() {
        let label = candidate
            .phi
            .map_or_else(|| "n/a".to_string(), |p| format!("{p:.2}"));
        let dark = candidate.phi.is_some_and(|p| (p / limit).abs() > 0.6);
        let colour = if dark { "#ffffff" } else { "#222222" };
        let extra = format!("fill=\"{colour}\" dominant-baseline=\"middle\"");
        out.push_str(&text(
            x + w / 2.0,
            y + h / 2.0,
            10,
            "middle",
            &extra,
            &label,
        ));
    }
    out
}

/// Thick outline around the chosen cell.
fn chosen_outline(grid: &Grid, chosen: &Candidate) -> String {
    match grid.position(chosen.times, chosen.days) {
        Some((x, y)) => format!(
            "<rect class=\"chosen\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"none\" \
             stroke=\"#000000\" stroke-width=\"3.5\"/>\n",
            x + 1.0,
            y + 1.0,
            grid.cell_w - 2.0,
            grid.cell_h - 2.0
        ),
        None => String::new(),
    }
}

/// Tick labels and titles of both heatmap axes.
fn heat_axes(grid: &Grid) -> String {
    let mut out = String::new();
    let bottom = grid.top + grid.height();
    for (i, times) in grid.times.iter().enumerate() {
        let x = grid.left + (i as f64 + 0.5) * grid.cell_w;
        out.push_str(&text(
            x,
            bottom + 15.0,
            11,
            "middle",
            "",
            &times.to_string(),
        ));
    }
    for days in &grid.days {
        if let Some((_, y)) = grid.position(grid.times.first().copied().unwrap_or_default(), *days)
        {
            let extra = "dominant-baseline=\"middle\"";
            out.push_str(&text(
                grid.left - 6.0,
                y + grid.cell_h / 2.0,
                11,
                "end",
                extra,
                &days.to_string(),
            ));
        }
    }
    let centre_x = grid.left + grid.width() / 2.0;
    out.push_str(&text(
        centre_x,
        bottom + 34.0,
        12,
        "middle",
        "",
        "at least x times",
    ));
    let centre_y = grid.top + grid.height() / 2.0;
    let rotate = format!(
        "transform=\"rotate(-90 {:.1} {centre_y:.1})\"",
        grid.left - 40.0
    );
    out.push_str(&text(
        grid.left - 40.0,
        centre_y,
        12,
        "middle",
        &rotate,
        "within y days",
    ));
    out
}

/// Legend tick label: signed to one decimal, plain "0" in the middle.
fn legend_label(value: f64) -> String {
    if value == 0.0 {
        "0".to_string()
    } else {
        format!("{value:+.1}")
    }
}

/// Vertical colour legend from −limit (bottom) to +limit (top), plus the hatch key.
fn heat_legend(x: f64, top: f64, limit: f64) -> String {
    let (height, steps) = (160.0, 40);
    let mut out = text(x, top - 8.0, 11, "start", "", "phi");
    for i in 0..steps {
        let value = limit - 2.0 * limit * (i as f64 + 0.5) / steps as f64;
        let y = top + height * i as f64 / steps as f64;
        let _ = writeln!(
            out,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"14\" height=\"{:.2}\" fill=\"{}\"/>",
            height / steps as f64 + 0.3,
            phi_colour(value, limit)
        );
    }
    let _ = writeln!(
        out,
        "<rect x=\"{x:.1}\" y=\"{top:.1}\" width=\"14\" height=\"{height}\" fill=\"none\" stroke=\"#888888\"/>"
    );
    for (value, y) in [
        (limit, top),
        (0.0, top + height / 2.0),
        (-limit, top + height),
    ] {
        let extra = "dominant-baseline=\"middle\"";
        out.push_str(&text(x + 18.0, y, 10, "start", extra, &legend_label(value)));
    }
    let key_y = top + height + 16.0;
    let _ = writeln!(
        out,
        "<rect x=\"{x:.1}\" y=\"{key_y:.1}\" width=\"14\" height=\"14\" fill=\"url(#ns-hatch)\" stroke=\"#888888\"/>"
    );
    out.push_str(&text(
        x + 18.0,
        key_y + 11.0,
        10,
        "start",
        "",
        "fails guards",
    ));
    let none_y = key_y + 20.0;
    let _ = writeln!(
        out,
        "<rect x=\"{x:.1}\" y=\"{none_y:.1}\" width=\"14\" height=\"14\" fill=\"{NO_DATA}\" stroke=\"#888888\"/>"
    );
    out.push_str(&text(x + 18.0, none_y + 11.0, 10, "start", "", "no data"));
    out
}

/// The heatmap drawn at vertical offset `top`, shared by [`phi_heatmap`] and [`report_svg`].
fn heatmap_fragment(
    candidates: &[Candidate],
    chosen: Option<&Candidate>,
    title: &str,
    top: f64,
) -> Fragment {
    let mut body = hatch_defs();
    body.push_str(&text(
        WIDTH / 2.0,
        top + 24.0,
        15,
        "middle",
        "font-weight=\"bold\"",
        title,
    ));
    let grid = Grid::new(candidates, top + TOP);
    if candidates.is_empty() {
        body.push_str(&text(
            WIDTH / 2.0,
            top + TOP + 40.0,
            13,
            "middle",
            "",
            "no candidates to draw",
        ));
        return Fragment {
            body,
            height: TOP + 80.0,
        };
    }
    let limit = colour_limit(candidates);
    for candidate in candidates {
        body.push_str(&heat_cell(&grid, candidate, limit));
    }
    if let Some(chosen) = chosen {
        body.push_str(&chosen_outline(&grid, chosen));
    }
    body.push_str(&heat_axes(&grid));
    body.push_str(&heat_legend(
        grid.left + grid.width() + 24.0,
        grid.top + 10.0,
        limit,
    ));
    let height = TOP + grid.height().max(210.0) + 50.0;
    Fragment { body, height }
}

/// Heatmap of phi over the (times × days) grid, so the strength of every threshold is visible.
///
/// Cells failing the guards are hatched, cells with undefined phi are grey, and the chosen cell
/// (matched by times and days) is outlined thickly.
pub fn phi_heatmap(candidates: &[Candidate], chosen: Option<&Candidate>, title: &str) -> String {
    let fragment = heatmap_fragment(candidates, chosen, title, 0.0);
    document(&fragment.body, fragment.height)
}

/// Points of one retention series, split where the value is undefined.
fn series_segments(points: &[(u32, Option<f64>)]) -> Vec<Vec<(u32, f64)>> {
    let mut segments = vec![Vec::new()];
    for &(times, value) in points {
        match (value, segments.last_mut()) {
            (Some(v), Some(segment)) => segment.push((times, v)),
            (None, Some(segment)) if !segment.is_empty() => segments.push(Vec::new()),
            _ => {}
        }
    }
    segments.retain(|s| !s.is_empty());
    segments
}

/// Maps data to pixels for the retention chart.
struct LineScale {
    min_x: u32,
    max_x: u32,
    left: f64,
    top: f64,
}

impl LineScale {
    fn x(&self, times: u32) -> f64 {
        let span = (self.max_x - self.min_x).max(1) as f64;
        let offset = if self.max_x == self.min_x {
            0.5
        } else {
            (times - self.min_x) as f64 / span
        };
        self.left + offset * LINE_W
    }

    fn y(&self, fraction: f64) -> f64 {
        self.top + (1.0 - fraction.clamp(0.0, 1.0)) * LINE_H
    }
}

/// Axes, gridlines and tick labels of the retention chart.
fn line_axes(scale: &LineScale, times: &[u32]) -> String {
    let mut out = String::new();
    for pct in [0, 25, 50, 75, 100] {
        let y = scale.y(pct as f64 / 100.0);
        let _ = writeln!(
            out,
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>",
            scale.left,
            scale.left + LINE_W
        );
        let extra = "dominant-baseline=\"middle\"";
        out.push_str(&text(
            scale.left - 6.0,
            y,
            11,
            "end",
            extra,
            &format!("{pct}%"),
        ));
    }
    let bottom = scale.top + LINE_H;
    for &t in times {
        out.push_str(&text(
            scale.x(t),
            bottom + 15.0,
            11,
            "middle",
            "",
            &t.to_string(),
        ));
    }
    let _ = writeln!(
        out,
        "<path d=\"M{:.1} {:.1} V{bottom:.1} H{:.1}\" fill=\"none\" stroke=\"#555555\"/>",
        scale.left,
        scale.top,
        scale.left + LINE_W
    );
    out.push_str(&text(
        scale.left + LINE_W / 2.0,
        bottom + 34.0,
        12,
        "middle",
        "",
        "at least x times",
    ));
    let centre_y = scale.top + LINE_H / 2.0;
    let rotate = format!(
        "transform=\"rotate(-90 {:.1} {centre_y:.1})\"",
        scale.left - 50.0
    );
    out.push_str(&text(
        scale.left - 50.0,
        centre_y,
        12,
        "middle",
        &rotate,
        "retained (%)",
    ));
    out
}

/// One coloured series: polylines plus circular markers.
fn line_series(scale: &LineScale, points: &[(u32, Option<f64>)], colour: &str) -> String {
    let mut out = String::new();
    for segment in series_segments(points) {
        let coords: Vec<String> = segment
            .iter()
            .map(|&(t, v)| format!("{:.1},{:.1}", scale.x(t), scale.y(v)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
            coords.join(" ")
        );
        for (t, v) in segment {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{colour}\"><title>{t}: {}</title></circle>",
                scale.x(t),
                scale.y(v),
                percent_tenths(v)
            );
        }
    }
    out
}

/// Legend naming both series, in one row under the chart so it never hides a line.
fn line_legend(x: f64, y: f64) -> String {
    let mut out = String::new();
    for (i, (label, colour)) in [
        ("retention above threshold", ABOVE_COLOUR),
        ("retention below threshold", BELOW_COLOUR),
    ]
    .iter()
    .enumerate()
    {
        let (x, row) = (x + i as f64 * 210.0, y);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{row:.1}\" x2=\"{:.1}\" y2=\"{row:.1}\" stroke=\"{colour}\" stroke-width=\"2\"/>\
             <circle cx=\"{:.1}\" cy=\"{row:.1}\" r=\"3.5\" fill=\"{colour}\"/>",
            x + 22.0,
            x + 11.0
        );
        out.push_str(&text(
            x + 28.0,
            row,
            11,
            "start",
            "dominant-baseline=\"middle\"",
            label,
        ));
    }
    out
}

/// The retention chart drawn at vertical offset `top`.
fn retention_fragment(
    candidates: &[Candidate],
    days: u32,
    chosen: Option<u32>,
    title: &str,
    top: f64,
) -> Fragment {
    let mut row: Vec<&Candidate> = candidates.iter().filter(|c| c.days == days).collect();
    row.sort_by_key(|c| c.times);
    row.dedup_by_key(|c| c.times);
    let mut body = text(
        WIDTH / 2.0,
        top + 24.0,
        15,
        "middle",
        "font-weight=\"bold\"",
        title,
    );
    let times: Vec<u32> = row.iter().map(|c| c.times).collect();
    let scale = LineScale {
        min_x: times.first().copied().unwrap_or(0),
        max_x: times.last().copied().unwrap_or(0),
        left: LEFT,
        top: top + TOP,
    };
    body.push_str(&line_axes(&scale, &times));
    if row.is_empty() {
        let message = format!("no candidates with {days} days");
        body.push_str(&text(
            LEFT + LINE_W / 2.0,
            scale.top + LINE_H / 2.0,
            13,
            "middle",
            "",
            &message,
        ));
    }
    let above: Vec<(u32, Option<f64>)> = row.iter().map(|c| (c.times, c.retention_above)).collect();
    let below: Vec<(u32, Option<f64>)> = row.iter().map(|c| (c.times, c.retention_below)).collect();
    if let Some(times) = chosen.filter(|t| times.contains(t)) {
        body.push_str(&chosen_marker(&scale, times));
    }
    body.push_str(&line_series(&scale, &above, ABOVE_COLOUR));
    body.push_str(&line_series(&scale, &below, BELOW_COLOUR));
    body.push_str(&line_legend(
        LEFT + LINE_W / 2.0 - 200.0,
        scale.top + LINE_H + 58.0,
    ));
    Fragment {
        body,
        height: TOP + LINE_H + 80.0,
    }
}

/// A dashed vertical line at the chosen x, labelled, under the series.
fn chosen_marker(scale: &LineScale, times: u32) -> String {
    let x = scale.x(times);
    let mut out = format!(
        "<line class=\"chosen-x\" x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" \
         stroke=\"#000000\" stroke-width=\"1.5\" stroke-dasharray=\"5,4\"/>\n",
        scale.top,
        scale.top + LINE_H
    );
    out.push_str(&text(
        x + 4.0,
        scale.top + 12.0,
        11,
        "start",
        "",
        &format!("chosen: at least {times}"),
    ));
    out
}

/// Retention above vs below the threshold (percent) against times x, for one window of `days`.
///
/// Shows how sharply retention separates as the threshold rises, which phi alone hides.
pub fn retention_chart(candidates: &[Candidate], days: u32, title: &str) -> String {
    let fragment = retention_fragment(candidates, days, None, title, 0.0);
    document(&fragment.body, fragment.height)
}

/// Format an optional fraction as a percentage, "n/a" when undefined.
fn pct_or_na(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), percent_tenths)
}

/// One-line summary of a chosen threshold, as shown in the report header.
pub(crate) fn summary_line(chosen: &Candidate) -> String {
    let phi = chosen
        .phi
        .map_or_else(|| "n/a".to_string(), |p| format!("{p:.2}"));
    let interval = match (chosen.phi_ci_low, chosen.phi_ci_high) {
        (Some(low), Some(high)) => format!(" [{low:.2}, {high:.2}]"),
        _ => String::new(),
    };
    format!(
        "at least {} times in {} days: phi {phi}{interval}, retention {} vs {} (share above {})",
        chosen.times,
        chosen.days,
        pct_or_na(chosen.retention_above),
        pct_or_na(chosen.retention_below),
        percent_tenths(chosen.share_above)
    )
}

/// Which window the retention chart shows: the chosen one, else the best-ranked candidate's.
fn report_days(evaluation: &Evaluation) -> Option<u32> {
    evaluation
        .chosen
        .as_ref()
        .or(evaluation.candidates.first())
        .map(|c| c.days)
}

/// Who the picture counted: the cohort's size and the end of the data it was judged against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counted<'a> {
    /// People in the cohort.
    pub(crate) cohort: u64,
    /// End of the data (RFC 3339).
    pub(crate) as_of: &'a str,
}

/// The whole activation picture in one SVG: header, heatmap, retention chart.
///
/// The header names the event, who was counted (the cohort and the end of its data, so a
/// picture read on its own says what it stands for) and the chosen threshold, or the reason
/// nothing was chosen.
pub(crate) fn report_svg(evaluation: &Evaluation, event: &str, counted: Counted<'_>) -> String {
    let header = format!(
        "Activation: {event} ({} people, data to {})",
        counted.cohort, counted.as_of
    );
    let mut body = text(20.0, 30.0, 18, "start", &fitted(&header, 18), &header);
    let line = match (&evaluation.chosen, &evaluation.reason) {
        (Some(chosen), _) => summary_line(chosen),
        (None, Some(reason)) => format!("no threshold chosen: {reason}"),
        (None, None) => "no threshold chosen".to_string(),
    };
    body.push_str(&text(20.0, 54.0, 13, "start", "", &line));
    let mut top = 70.0;
    let heat = heatmap_fragment(
        &evaluation.candidates,
        evaluation.chosen.as_ref(),
        "phi by threshold",
        top,
    );
    body.push_str(&heat.body);
    top += heat.height;
    if let Some(days) = report_days(evaluation) {
        let title = format!("retention by threshold, within {days} days");
        let chosen = evaluation
            .chosen
            .as_ref()
            .filter(|c| c.days == days)
            .map(|c| c.times);
        let chart = retention_fragment(&evaluation.candidates, days, chosen, &title, top);
        body.push_str(&chart.body);
        top += chart.height;
    }
    document(&body, top)
}

#[cfg(test)]
mod tests {
    use super::super::stats::{Cell, Guards, evaluate};
    use super::*;

    const COUNTED: Counted<'static> = Counted {
        cohort: 2000,
        as_of: "2026-03-01T00:00:00Z",
    };

    fn grid_evaluation() -> Evaluation {
        let mut cells = Vec::new();
        for times in 1..=10 {
            for days in 1..=15 {
                let distance = (times as u64).abs_diff(3) + (days as u64).abs_diff(7);
                let signal = 100u64.saturating_sub(9 * distance);
                cells.push(Cell {
                    times,
                    days,
                    a: 100 + signal,
                    b: 110 - signal / 2,
                    c: 110 - signal / 2,
                    d: 100 + signal,
                });
            }
        }
        cells.push(Cell {
            times: 1,
            days: 1,
            a: 5,
            b: 0,
            c: 0,
            d: 5,
        });
        evaluate(&cells, &Guards::default())
    }

    fn assert_wellformed(svg: &str) {
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<svg").count(), svg.matches("</svg>").count());
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        assert!(!svg.contains("NaN") && !svg.contains("=\"inf"));
    }

    #[test]
    fn heatmap_outlines_exactly_the_chosen_cell() {
        let evaluation = grid_evaluation();
        let chosen = evaluation.chosen.as_ref();
        assert_eq!(chosen.map(|c| (c.times, c.days)), Some((3, 7)));
        let svg = phi_heatmap(&evaluation.candidates, chosen, "phi");
        assert_wellformed(&svg);
        assert_eq!(svg.matches("class=\"chosen\"").count(), 1);
        assert!(
            svg.contains("class=\"guarded\""),
            "small cells should be hatched"
        );
        assert!(svg.contains("at least x times") && svg.contains("within y days"));
        assert!(
            svg.contains(">0.43<") || svg.contains(">0.4"),
            "phi labels expected"
        );
    }

    #[test]
    fn titles_are_escaped() {
        let evaluation = grid_evaluation();
        let svg = phi_heatmap(&evaluation.candidates, None, "a < b & \"c\"");
        assert!(svg.contains("a &lt; b &amp; &quot;c&quot;"));
        assert!(!svg.contains("a < b"));
        assert_eq!(svg.matches("class=\"chosen\"").count(), 0);
        let report = report_svg(&evaluation, "<script>&", COUNTED);
        assert!(report.contains("&lt;script&gt;&amp;"));
        assert!(!report.contains("<script>"));
    }

    #[test]
    fn retention_chart_has_two_series_and_legend() {
        let evaluation = grid_evaluation();
        let svg = retention_chart(&evaluation.candidates, 7, "retention");
        assert_wellformed(&svg);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains(ABOVE_COLOUR) && svg.contains(BELOW_COLOUR));
        assert!(
            svg.contains("retention above threshold") && svg.contains("retention below threshold")
        );
        assert_eq!(svg.matches("<circle").count(), 2 * 10 + 2);
    }

    #[test]
    fn a_long_header_is_drawn_within_the_picture() {
        assert_eq!(fitted("Activation: short", 18), "font-weight=\"bold\"");
        let long =
            "Activation: core_action_completed (2000 people, data to 2026-12-07T19:55:41.799Z)";
        assert!(fitted(long, 18).contains("textLength=\"720\""));
    }

    #[test]
    fn report_names_event_and_choice() {
        let evaluation = grid_evaluation();
        let svg = report_svg(&evaluation, "core_action_completed", COUNTED);
        assert_wellformed(&svg);
        assert!(svg.contains(
            "Activation: core_action_completed (2000 people, data to 2026-03-01T00:00:00Z)"
        ));
        assert!(svg.contains("at least 3 times in 7 days: phi "));
        assert!(svg.contains("retention "));
        assert_eq!(svg.matches("class=\"chosen\"").count(), 1);
        assert_eq!(
            svg.matches("class=\"chosen-x\"").count(),
            1,
            "the chosen x is marked"
        );
        assert!(svg.contains(">chosen: at least 3<"));
    }

    /// A cell without data is grey and unhatched; a cell with data that fails a guard is
    /// hatched; the legend names both.
    #[test]
    fn no_data_is_told_apart_from_failing_the_guards() {
        let cells = [
            Cell {
                times: 1,
                days: 1,
                a: 0,
                b: 0,
                c: 40,
                d: 60,
            },
            Cell {
                times: 2,
                days: 1,
                a: 3,
                b: 1,
                c: 40,
                d: 60,
            },
        ];
        let evaluation = evaluate(&cells, &Guards::default());
        let svg = phi_heatmap(&evaluation.candidates, None, "phi");
        assert_eq!(svg.matches("class=\"guarded\"").count(), 1, "{svg}");
        assert!(svg.contains(&format!("fill=\"{NO_DATA}\" stroke=\"#ffffff\"")));
        assert!(svg.contains(">no data<") && svg.contains(">fails guards<"));
    }

    #[test]
    fn empty_grid_does_not_panic() {
        let evaluation = evaluate(&[], &Guards::default());
        let report = report_svg(&evaluation, "e", COUNTED);
        assert_wellformed(&report);
        assert!(report.contains("no threshold chosen: no candidates"));
        assert_wellformed(&phi_heatmap(&[], None, "empty"));
        assert_wellformed(&retention_chart(&[], 7, "empty"));
        let one = evaluate(
            &[Cell {
                times: 2,
                days: 3,
                a: 0,
                b: 0,
                c: 0,
                d: 0,
            }],
            &Guards::default(),
        );
        assert_wellformed(&report_svg(&one, "e", COUNTED));
        assert_wellformed(&retention_chart(&one.candidates, 3, "one"));
    }
}
