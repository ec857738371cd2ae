-- A holdout experiment's people: each person who signed up while the experiment ran, with
-- their North Star events within the threshold's window, whether they were retained, and
-- their customer. northstar assigns each person's arm (the experiment flag's bucket, as the
-- flags answer gives it) and counts the arms.
--
-- Placeholders (as in histogram.sql, filled by northstar):
--   {signup} {north_star}      event names (SQL string literals)
--   {from_us} {to_us}          the span signups are enrolled in (UTC µs, [from, to))
--   {days}                     the threshold's window in days
--   {retain_from} {retain_to}  retention window in days after signup, [from, to)
--   {active}                   extra condition on retention events ("" = any event counts)
--   {counted}                  which of a person's events count (activation.windowStart)
--   US(x)                      a timestamp as UTC microseconds (engine-specific)
WITH resolved AS (
    SELECT coalesce(iu.person_id, e.user_id, ia.person_id, e.anonymous_id) AS person_id,
           e.event,
           e."timestamp" AS ts,
           e.customer_id
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
    SELECT person_id, signup_at
    FROM signups
    WHERE US(signup_at) >= {from_us} AND US(signup_at) < {to_us}
),
offsets AS (
    SELECT c.person_id,
           c.signup_at,
           CAST(floor((US(r.ts) - US(c.signup_at)) / 86400000000.0) AS BIGINT) AS day,
           r.event,
           r.customer_id
    FROM cohort c
    JOIN resolved r ON r.person_id = c.person_id
    WHERE {counted}
)
SELECT person_id,
       min(US(signup_at)) AS signup_us,
       sum(CASE WHEN event = {north_star} AND day < {days} THEN 1 ELSE 0 END) AS stars,
       max(CASE WHEN day >= {retain_from} AND day < {retain_to} {active} THEN 1 ELSE 0 END) AS retained,
       max(customer_id) AS customer_id
FROM offsets
GROUP BY person_id
