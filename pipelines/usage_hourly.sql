-- window: 1h
-- incremental
-- Usage of every metered feature per customer in hourly tumbling windows.
--
-- northstar runs this for each day ({date}) whose events changed since the last run: as
-- commits land, and again when a late event reaches an older day. Being `incremental`, each
-- run reads only the events the day gained since its file was written, and their windows are
-- merged into that day's file in data/usage/pipeline=usage_hourly/ (sums add, maxima take
-- the larger). Billing anchors are whole hours, so hourly windows tile every usage period
-- exactly.
SELECT customer_id,
       feature,
       date_bin(INTERVAL '1 hour', "timestamp", TIMESTAMP '1970-01-01T00:00:00Z') AS window_start,
       date_bin(INTERVAL '1 hour', "timestamp", TIMESTAMP '1970-01-01T00:00:00Z') + INTERVAL '1 hour' AS window_end,
       sum(quantity) AS quantity,
       max(quantity) AS max_quantity,
       count(*) AS events,
       max(seq) AS max_seq
FROM metered_events
WHERE date = '{date}'
GROUP BY customer_id, feature, window_start
