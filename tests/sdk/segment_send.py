"""Sends one call of each type through Segment's official Python SDK (segment-analytics-python)
to the northstar at argv[1] with write key argv[2]. Exits 1 if the SDK reports any error."""
import sys

import segment.analytics as analytics

base, write_key = sys.argv[1], sys.argv[2]
errors = []
analytics.write_key = write_key
analytics.host = base
analytics.gzip = True
analytics.max_retries = 2
analytics.on_error = lambda error, batch: errors.append(repr(error))

ctx = {"groupId": "py-co"}
analytics.track("py-user", "api_call_made", {"endpoint": "/py", "latency_ms": 12}, context=ctx, message_id="py-1")
analytics.identify("py-user", {"plan": "pro"}, anonymous_id="py-anon", message_id="py-2")
analytics.page("py-user", "Docs", "Intro", {"url": "https://x/docs"}, message_id="py-3")
analytics.screen("py-user", "Mobile", "Home", message_id="py-4")
analytics.group("py-user", "py-co", {"name": "Py Co"}, message_id="py-5")
analytics.alias("py-anon", "py-user", message_id="py-6")
analytics.flush()
analytics.shutdown()
if errors:
    print("segment SDK errors:", errors)
    sys.exit(1)
print("sent 6")
