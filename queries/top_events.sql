-- The most frequent events of the last 7 days, with how many customers send each.
SELECT event,
       type,
       count(*) AS events,
       count(DISTINCT customer_id) AS customers
FROM events
WHERE timestamp >= now() - INTERVAL '7 days'
GROUP BY event, type
ORDER BY events DESC
LIMIT 20;
