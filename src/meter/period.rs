//! Usage periods: they start at the customer's billing anchor and repeat daily, weekly,
//! monthly or yearly. Anchors are whole hours (UTC), so hourly usage windows tile every period
//! exactly. A monthly anchor on the 31st starts February's period on its last day.

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Timelike, Utc};

use crate::config::PeriodKind;

/// One usage period, `[start, end)` in UTC microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    /// First instant of the period.
    pub start: i64,
    /// First instant of the next period.
    pub end: i64,
}

/// An anchor cut to its hour: periods start on whole hours.
pub(crate) fn anchor_hour(anchor_micros: i64) -> i64 {
    anchor_micros - anchor_micros.rem_euclid(3_600_000_000)
}

/// The default anchor: the Unix epoch, so monthly periods are calendar months.
pub(crate) const DEFAULT_ANCHOR: i64 = 0;

/// The period of `kind` anchored at `anchor` that contains `at`.
pub(crate) fn period_at(kind: PeriodKind, anchor: i64, at: i64) -> Period {
    let anchor = anchor_hour(anchor);
    match kind {
        PeriodKind::Daily => fixed(anchor, at, 86_400_000_000),
        PeriodKind::Weekly => fixed(anchor, at, 7 * 86_400_000_000),
        PeriodKind::Monthly => calendar(anchor, at, 1),
        PeriodKind::Yearly => calendar(anchor, at, 12),
    }
}

fn fixed(anchor: i64, at: i64, length: i64) -> Period {
    let k = (at - anchor).div_euclid(length);
    let start = anchor + k * length;
    Period {
        start,
        end: start + length,
    }
}

/// Periods of `months` months whose start keeps the anchor's day of month and hour.
fn calendar(anchor: i64, at: i64, months: i32) -> Period {
    let anchor_time = to_datetime(anchor);
    let at_time = to_datetime(at);
    let day = anchor_time.day();
    let hour = anchor_time.hour();
    // Months since the anchor's month, rounded down to a whole number of periods.
    let month_index = |t: &DateTime<Utc>| t.year() * 12 + t.month0() as i32;
    let anchor_month = month_index(&anchor_time);
    let mut offset = (month_index(&at_time) - anchor_month).div_euclid(months) * months;
    let start_of = |offset: i32| start_in_month(anchor_month + offset, day, hour);
    let mut start = start_of(offset);
    if start > at {
        offset -= months;
        start = start_of(offset);
    }
    Period {
        start,
        end: start_of(offset + months),
    }
}

/// The anchor's day (clamped to the month's last day) and hour in month number `index`.
fn start_in_month(index: i32, day: u32, hour: u32) -> i64 {
    let year = index.div_euclid(12);
    let month = index.rem_euclid(12) as u32 + 1;
    let last_day = days_in_month(year, month);
    let date = NaiveDate::from_ymd_opt(year, month, day.min(last_day)).unwrap_or_default();
    let time = date.and_hms_opt(hour, 0, 0).unwrap_or_default();
    Utc.from_utc_datetime(&time).timestamp_micros()
}

fn days_in_month(year: i32, month: u32) -> u32 {
    let first = NaiveDate::from_ymd_opt(year, month, 1).unwrap_or_default();
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year + 1, 1, 1)
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)
    }
    .unwrap_or_default();
    u32::try_from((next - first).num_days()).unwrap_or(28)
}

fn to_datetime(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(micros).unwrap_or(DateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_micros()
    }

    fn p(kind: PeriodKind, anchor: &str, at: &str) -> (String, String) {
        let period = period_at(kind, t(anchor), t(at));
        (
            crate::clock::format_micros(period.start),
            crate::clock::format_micros(period.end),
        )
    }

    #[test]
    fn monthly_periods_keep_the_anchor_day() {
        let got = p(
            PeriodKind::Monthly,
            "2026-01-15T09:30:00Z",
            "2026-03-20T00:00:00Z",
        );
        assert_eq!(
            got,
            (
                "2026-03-15T09:00:00.000Z".into(),
                "2026-04-15T09:00:00.000Z".into()
            )
        );
        let before_anchor = p(
            PeriodKind::Monthly,
            "2026-01-15T09:00:00Z",
            "2026-03-15T08:59:59Z",
        );
        assert_eq!(before_anchor.0, "2026-02-15T09:00:00.000Z");
    }

    #[test]
    fn an_anchor_on_the_31st_uses_short_months_last_day() {
        let got = p(
            PeriodKind::Monthly,
            "2026-01-31T00:00:00Z",
            "2026-03-01T00:00:00Z",
        );
        assert_eq!(
            got,
            (
                "2026-02-28T00:00:00.000Z".into(),
                "2026-03-31T00:00:00.000Z".into()
            )
        );
    }

    #[test]
    fn the_default_anchor_gives_calendar_months() {
        let period = period_at(
            PeriodKind::Monthly,
            DEFAULT_ANCHOR,
            t("2026-11-26T18:00:00Z"),
        );
        assert_eq!(
            crate::clock::format_micros(period.start),
            "2026-11-01T00:00:00.000Z"
        );
        assert_eq!(
            crate::clock::format_micros(period.end),
            "2026-12-01T00:00:00.000Z"
        );
    }

    #[test]
    fn daily_weekly_and_yearly() {
        assert_eq!(
            p(
                PeriodKind::Daily,
                "2026-01-01T06:00:00Z",
                "2026-05-05T05:00:00Z"
            ),
            (
                "2026-05-04T06:00:00.000Z".into(),
                "2026-05-05T06:00:00.000Z".into()
            )
        );
        assert_eq!(
            p(
                PeriodKind::Weekly,
                "2026-01-05T00:00:00Z",
                "2026-01-20T12:00:00Z"
            ),
            (
                "2026-01-19T00:00:00.000Z".into(),
                "2026-01-26T00:00:00.000Z".into()
            )
        );
        assert_eq!(
            p(
                PeriodKind::Yearly,
                "2024-02-29T00:00:00Z",
                "2026-06-01T00:00:00Z"
            ),
            (
                "2026-02-28T00:00:00.000Z".into(),
                "2027-02-28T00:00:00.000Z".into()
            )
        );
    }

    #[test]
    fn anchors_before_the_instant_and_after_it_agree() {
        let later_anchor = p(
            PeriodKind::Monthly,
            "2027-06-10T00:00:00Z",
            "2026-03-12T00:00:00Z",
        );
        assert_eq!(later_anchor.0, "2026-03-10T00:00:00.000Z");
    }
}
