-- Daily active people (identified users, else anonymous ids) over the last 30 days.
SELECT date,
       count(DISTINCT coalesce(user_id, anonymous_id)) AS active,
       count(*) AS events
FROM events
WHERE timestamp >= now() - INTERVAL '30 days'
GROUP BY date
ORDER BY date;
