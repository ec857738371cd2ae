-- Why messages were rejected in the last day, by source and offending field.
SELECT source,
       json_get_str(reasons, 0, 'field') AS field,
       json_get_str(reasons, 0, 'message') AS reason,
       count(*) AS messages
FROM rejected_events
WHERE received_at >= now() - INTERVAL '1 day'
GROUP BY source, field, reason
ORDER BY messages DESC;
