-- Retention: people by the period of their first cohort event, and how many of them did the
-- return event in each period after it (`POST /v1/insights/retention`).
--
-- Placeholders (filled by northstar; the answer carries the SQL it ran):
--   {cohort_event} {return_event}  event names (SQL string literals)
--   {from_us} {to_us}   people enter with a first cohort event in [from, to) (UTC µs)
--   {period}            'day' or 'week' (UTC; a week starts on Monday)
--   {period_us}         the period's length, µs
--   {periods}           periods reported, 0 (the cohort's own) to periods − 1
--   US(x)               a timestamp as UTC microseconds (engine-specific)
--
-- Period k of a person is the calendar period k after the one of their first cohort event; a
-- return counts from that first event on (period 0 is the rest of the first period). People
-- are resolved through identity merges.
WITH firsts AS (
    SELECT person_id, min("timestamp") AS first_at
    FROM events_resolved
    WHERE event = {cohort_event}
      AND US("timestamp") >= {from_us}
      AND US("timestamp") < {to_us}
      AND person_id IS NOT NULL
    GROUP BY person_id
),
cohorts AS (
    SELECT person_id, first_at, US(date_trunc({period}, first_at)) AS cohort
    FROM firsts
),
returns AS (
    SELECT DISTINCT c.person_id, c.cohort,
           (US(date_trunc({period}, r."timestamp")) - c.cohort) / {period_us} AS k
    FROM cohorts c
    JOIN events_resolved r ON r.person_id = c.person_id
    WHERE r.event = {return_event} AND r."timestamp" >= c.first_at
)
SELECT cohort, -1 AS k, count(*) AS people FROM cohorts GROUP BY cohort
UNION ALL
SELECT cohort, k, count(*) AS people FROM returns WHERE k < {periods} GROUP BY cohort, k
