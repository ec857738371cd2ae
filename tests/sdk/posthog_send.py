"""Sends events through PostHog's official Python SDK (posthog) to the northstar at argv[1]
with project key argv[2]. Exits 1 if the SDK reports any error."""
import sys

from posthog import Posthog

base, api_key = sys.argv[1], sys.argv[2]
errors = []
client = Posthog(
    api_key,
    host=base,
    on_error=lambda error, batch: errors.append(repr(error)),
    enable_local_evaluation=False,
    max_retries=2,
    gzip=True,
)
client.capture("api_call_made", distinct_id="ph-user", properties={"endpoint": "/ph"},
               groups={"customer": "ph-co"}, uuid="0190d5a0-0000-7000-8000-0000000000a1")
client.capture("signup_completed", distinct_id="ph-user", properties={"plan": "free"},
               uuid="0190d5a0-0000-7000-8000-0000000000a2")
client.alias(previous_id="ph-anon", distinct_id="ph-user", uuid="0190d5a0-0000-7000-8000-0000000000a3")
client.group_identify("customer", "ph-co", {"name": "PH Co"}, uuid="0190d5a0-0000-7000-8000-0000000000a4")
client.flush()
client.shutdown()
if errors:
    print("posthog SDK errors:", errors)
    sys.exit(1)
print("sent 4")
