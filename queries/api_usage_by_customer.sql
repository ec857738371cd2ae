-- Metered API calls per customer and endpoint this month (JSON properties with ->>).
SELECT customer_id,
       properties->>'endpoint' AS endpoint,
       count(*) AS calls,
       avg(CAST(properties->>'latency_ms' AS DOUBLE)) AS avg_latency_ms
FROM events
WHERE event = 'api_call_made'
  AND timestamp >= date_trunc('month', now())
GROUP BY customer_id, endpoint
ORDER BY calls DESC;
