//! Fuzzes the ingest decoder: any bytes, as any wire's body, through decoding (gzip, base64,
//! forms), JSON parsing, normalisation and the registry. Nothing may panic, every message
//! must end accepted or rejected with a reason, and the fast Segment path must produce what the
//! reference path produces wherever it answers.
#![no_main]

use libfuzzer_sys::fuzz_target;
use northstar::config::Config;
use northstar::event::EventType;
use northstar::ingest::body::{Encoding, decode};
use northstar::ingest::{fast, posthog, segment};
use northstar::schema::Registry;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };
    let encoding = Encoding {
        gzip: selector & 1 != 0,
        form: selector & 2 != 0,
        base64: selector & 4 != 0,
    };
    let Ok(decoded) = decode(body, &encoding, 512 * 1024) else { return };
    let config = Config::default();
    let Ok(registry) = Registry::load(&config, None) else { return };
    let check = |mut record: northstar::event::EventRecord| {
        if let (EventType::Track, Some(name)) = (record.kind, record.event.clone()) {
            let _ = registry.decide(&name, &record.event_id, &record.properties, &mut record.context);
        }
        let bytes = record.to_bus_json();
        assert!(northstar::event::EventView::decode(&bytes).is_ok(), "a normalised event must read back");
    };
    if selector & 8 != 0 {
        let Ok(value) = serde_json::from_slice::<Value>(&decoded) else { return };
        if let Ok(capture) = posthog::split_body(value) {
            for event in capture.events {
                if let Ok(record) = posthog::normalize(event, "fuzz", 1_700_000_000_000_000) {
                    check(record);
                }
            }
        }
    } else if let Ok(envelope) = serde_json::from_slice::<segment::BatchEnvelope<'_>>(&decoded) {
        // The fast path must agree with the reference wherever it answers.
        let keys = northstar::ingest::auth::WriteKeys::default();
        let batch = fast::Batch {
            inherited: envelope.inherited(),
            source: "fuzz",
            received_at: 1_700_000_000_000_000,
            registry: &registry,
            shards: 8,
            max_message_bytes: 32 * 1024,
            time_bounds: northstar::ingest::normalize::TimeBounds {
                future_skew: 86_400_000_000,
                max_age: 400 * 86_400_000_000,
            },
            keys: &keys,
        };
        for raw in &envelope.batch {
            if let fast::Fast::Ready(quick) = fast::normalize(raw.get(), &batch) {
                let Ok(Some(reference)) = fast::reference(raw.get(), &batch) else {
                    panic!("fast path accepted what the reference did not: {}", raw.get());
                };
                let read = |p: &[u8]| serde_json::from_slice::<Value>(p).ok().map(|mut v| {
                    v["event_id"] = Value::Null;
                    v
                });
                assert_eq!(read(&quick.payload), read(&reference.payload), "{}", raw.get());
            }
        }
        for raw in &envelope.batch {
            if let Ok(Value::Object(message)) = serde_json::from_str::<Value>(raw.get())
                && let Ok(record) = segment::normalize(message, None, envelope.inherited(), "fuzz", 1_700_000_000_000_000)
            {
                check(record);
            }
        }
    } else if let Ok(Value::Object(message)) = serde_json::from_slice::<Value>(&decoded)
        && let Ok(record) = segment::normalize(message, Some(EventType::Track), segment::Inherited::default(), "fuzz", 1_700_000_000_000_000)
    {
        check(record);
    }
});
