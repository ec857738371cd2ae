-- Activation ("aha") analysis: for each window y (within y days of signup) and each person of
-- the cohort, how many North Star events they did, and whether they were retained. northstar
-- counts the a/b/c/d cells of every "at least x times within y days" from this histogram.
--
-- Placeholders (filled by northstar, identically for DataFusion and for DuckDB in the benchmark):
--   {signup} {north_star}   event names (SQL string literals)
--   {cohort_end_us}         last signup time judged (UTC µs): people signed up after it are too young
--   {retain_from} {retain_to}  retention window in days after signup, [from, to)
--   {active}                extra condition on retention events ("" = any event counts)
--   {counted}               which of a person's events count (activation.windowStart): `TRUE`
--                           from their first event (`firstSeen`; those before signup fall on
--                           negative days, inside every window), `r.ts >= c.signup_at` from signup
--   {windows}               VALUES (1), (2), … (y)
--   {star_sums}             one column per window y: `sum(CASE WHEN star_day < y THEN 1 ELSE 0 END) AS t<y>`
--   {times_of_window}       `CASE w.y WHEN 1 THEN p.t1 … END`: a person's count within window y
--   US(x)                   a timestamp as UTC microseconds (engine-specific)
-- People are resolved through identity merges, so anonymous events before an identify count;
-- with `firstSeen` so do those before the signup. A window ends y days after signup either way.
--
-- Shape: one join of the cohort with its people's events and one aggregation per person (each
-- person's retention and their North Star count within every window as columns), then the
-- windows are unpivoted. Every CTE but `resolved` is used once, so an engine that inlines CTEs
-- (DataFusion) and one that materialises them (DuckDB) do the same work.
WITH resolved AS (
    SELECT coalesce(iu.person_id, e.user_id, ia.person_id, e.anonymous_id) AS person_id,
           e.event,
           e."timestamp" AS ts
    FROM events e
    LEFT JOIN identities iu ON iu.id = e.user_id
    LEFT JOIN identities ia ON ia.id = e.anonymous_id
),
signups AS (
    SELECT person_id, min(ts) AS signup_at
    FROM resolved
    WHERE event = {signup} AND person_id IS NOT NULL
    GROUP BY person_id
),
cohort AS (
    SELECT person_id, signup_at FROM signups WHERE US(signup_at) <= {cohort_end_us}
),
offsets AS (
    SELECT c.person_id,
           CAST(floor((US(r.ts) - US(c.signup_at)) / 86400000000.0) AS BIGINT) AS day,
           r.event
    FROM cohort c
    JOIN resolved r ON r.person_id = c.person_id
    WHERE {counted}
),
marks AS (
    -- Only the days that matter; day 0 (the signup itself) keeps every cohort member here.
    SELECT person_id,
           CASE WHEN day >= {retain_from} AND day < {retain_to} {active} THEN 1 ELSE 0 END AS active,
           CASE WHEN event = {north_star} AND day < {max_days} THEN day END AS star_day
    FROM offsets
    WHERE day < {max_days} OR (day >= {retain_from} AND day < {retain_to})
),
people AS (
    SELECT person_id,
           max(active) AS retained,
{star_sums}
    FROM marks
    GROUP BY person_id
),
windows AS (
    SELECT y FROM (VALUES {windows}) AS w(y)
)
SELECT w.y AS days, {times_of_window} AS times, p.retained AS retained, count(*) AS people
FROM people p
CROSS JOIN windows w
GROUP BY w.y, {times_of_window}, p.retained
