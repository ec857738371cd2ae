-- window: 1d
-- incremental
-- Usage of every metered feature per customer in daily (UTC) tumbling windows.
SELECT customer_id,
       feature,
       date_bin(INTERVAL '1 day', "timestamp", TIMESTAMP '1970-01-01T00:00:00Z') AS window_start,
       date_bin(INTERVAL '1 day', "timestamp", TIMESTAMP '1970-01-01T00:00:00Z') + INTERVAL '1 day' AS window_end,
       sum(quantity) AS quantity,
       max(quantity) AS max_quantity,
       count(*) AS events,
       max(seq) AS max_seq
FROM metered_events
WHERE date = '{date}'
GROUP BY customer_id, feature, window_start
