-- Activation ("aha") analysis: for each window y (within y days of signup) and each person of
-- the cohort, how many North Star events they did, and whether they were retained. northstar
-- counts the a/b/c/d cells of every "at least x times within y days" from this histogram.
--
-- Placeholders (filled by northstar, identically for DataFusion and for DuckDB in the benchmark):
--   {signup} {north_star}   event names (SQL string literals)
--   {cohort_end_us}         last signup time judged (UTC µs): people signed up after it are too young
--   {retain_from} {retain_to}  retention window in days after signup, [from, to)
--   {active}                extra condition on retention events ("" = any event counts)
--   {windows}               VALUES (1), (2), … (y)
--   US(x)                   a timestamp as UTC microseconds (engine-specific)
-- People are resolved through identity merges, so anonymous events before an identify count.
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
    WHERE r.ts >= c.signup_at
),
retention AS (
    SELECT person_id,
           max(CASE WHEN day >= {retain_from} AND day < {retain_to} {active} THEN 1 ELSE 0 END) AS retained
    FROM offsets
    GROUP BY person_id
),
north_star_days AS (
    SELECT person_id, day, count(*) AS n
    FROM offsets
    WHERE event = {north_star} AND day < {max_days}
    GROUP BY person_id, day
),
windows AS (
    SELECT y FROM (VALUES {windows}) AS w(y)
),
done AS (
    SELECT c.person_id, w.y, coalesce(sum(CASE WHEN f.day < w.y THEN f.n ELSE 0 END), 0) AS times
    FROM cohort c
    CROSS JOIN windows w
    LEFT JOIN north_star_days f ON f.person_id = c.person_id
    GROUP BY c.person_id, w.y
)
SELECT d.y AS days, d.times AS times, r.retained AS retained, count(*) AS people
FROM done d
JOIN retention r ON r.person_id = d.person_id
GROUP BY d.y, d.times, r.retained
