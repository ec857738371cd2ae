-- Funnel: the people who did each step in order, each step after the one before it and within
-- the conversion window of their first step (`POST /v1/insights/funnel`).
--
-- Placeholders (filled by northstar; the answer carries the SQL it ran, placeholders filled,
-- so `northstar sql` can run it again):
--   {step_names}    every step's event name (SQL string literals, comma separated)
--   {first_step}    the first step's name
--   {from_us} {to_us}  people enter with a first step in [from, to) (UTC µs)
--   {window_us}     conversion window, µs after the first step
--   {breakdown}     what splits the answer, read from the first step's event (NULL: no split)
--   {later_steps}   one CTE per later step k ≥ 2, from the STEP template below
--   {step_counts}   one SELECT per step, from the COUNT template below, joined by UNION ALL
--   US(x)           a timestamp as UTC microseconds; FIRST_BY(x, t) the x of the least t
--                   (engine-specific: rendered for DataFusion, and for DuckDB in `bench sql`)
--
-- A person enters at their first first-step event in the range; each later step is that
-- step's first event after the previous step's and before first step + window (the earliest
-- choice at each step, as PostHog's and Amplitude's ordered funnels take it). People are
-- resolved through identity merges, so an anonymous step joins the person who later
-- identifies.
WITH e AS (
    SELECT person_id, event, US("timestamp") AS ts, {breakdown} AS breakdown
    FROM events_resolved
    WHERE event IN ({step_names})
      AND US("timestamp") >= {from_us}
      AND US("timestamp") < {to_us} + {window_us}
      AND person_id IS NOT NULL
),
s1 AS (
    SELECT person_id,
           min(ts) AS t1,
           FIRST_BY(breakdown, ts) AS breakdown,
           min(ts) AS t_prev
    FROM e
    WHERE event = {first_step} AND ts < {to_us}
    GROUP BY person_id
){later_steps}
{step_counts}
-- STEP (k ≥ 2):
-- , s{k} AS (
--     SELECT p.person_id, p.t1, p.breakdown, min(e.ts) AS t_prev, min(e.ts) - p.t_prev AS took
--     FROM s{k-1} p JOIN e ON e.person_id = p.person_id
--     WHERE e.event = {step_k} AND e.ts > p.t_prev AND e.ts < p.t1 + {window_us}
--     GROUP BY p.person_id, p.t1, p.breakdown, p.t_prev
-- )
-- COUNT (k = 1 has no time to convert):
-- SELECT {k} AS step, breakdown, count(*) AS people, median(took) AS median_us FROM s{k} GROUP BY breakdown
