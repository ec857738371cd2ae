//! Fuzzes what the followers do with a stream message: any bytes through the decoder, then
//! through the meter's counters (every aggregation, every property as the quantity), the
//! billing windows, the identity graph and the onboarding engine, with state kept across
//! inputs so sums grow toward their bounds. Nothing may panic: a panic here is a follower
//! stopped (or, since supervision, a part marked failed) by one message.
#![no_main]

use std::sync::{LazyLock, Mutex};

use libfuzzer_sys::fuzz_target;
use northstar::billing::windows::Windows;
use northstar::config::{Aggregation, Config};
use northstar::event::{EventType, EventView};
use northstar::identity::graph::IdentityGraph;
use northstar::json::{JsonObject, RawObject};
use northstar::meter::state::Counters;
use northstar::onboarding::Onboarding;
use northstar::schema::quantity::{self, Contribution};

struct State {
    counters: Counters,
    windows: Windows,
    graph: IdentityGraph,
    onboarding: Onboarding,
    seq: u64,
}

static STATE: LazyLock<Mutex<State>> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("northstar-fuzz-{}", std::process::id()));
    Mutex::new(State {
        counters: Counters::default(),
        windows: Windows::new(3_600_000_000, 60_000_000),
        graph: IdentityGraph::default(),
        onboarding: Onboarding::new(
            &Config::default(),
            northstar::activation::ActivationStore::open(&dir),
            Box::new(|_| "free".to_string()),
        ),
        seq: 0,
    })
});

const AGGREGATIONS: [Aggregation; 5] = [
    Aggregation::Sum,
    Aggregation::Count,
    Aggregation::Max,
    Aggregation::Latest,
    Aggregation::UniqueCount,
];

fuzz_target!(|data: &[u8]| {
    let Ok(event) = EventView::decode(data) else { return };
    let mut state = STATE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    state.seq += 1;
    let seq = state.seq;
    let customer = event.customer_id.as_deref().unwrap_or("none");
    let properties = RawObject::parse(event.properties.get()).unwrap_or_default();
    let period_start = event.timestamp - event.timestamp.rem_euclid(86_400_000_000);
    for name in properties.field_names() {
        let value = properties.field(name);
        for (index, aggregation) in AGGREGATIONS.into_iter().enumerate() {
            let Ok(contribution) = quantity::quantity_of(Some(name), aggregation, value.as_deref())
            else {
                continue;
            };
            let group = quantity::group_key(&[name.to_string()], &properties);
            state.counters.lock(customer).apply(
                customer,
                u16::try_from(index).unwrap_or(0),
                aggregation,
                period_start,
                &contribution,
                Some(&group),
                event.timestamp,
                &event.event_id,
            );
            if let Contribution::Amount(amount) = contribution {
                let key = (customer.to_string(), name.to_string());
                state.windows.add(key, event.timestamp, event.received_at, amount);
            }
        }
    }
    let _ = state.windows.advance(event.received_at);
    if let Some(user) = event.user_id.as_deref() {
        state.graph.observe_user(user);
        match (event.kind, event.anonymous_id.as_deref()) {
            (EventType::Identify, Some(anonymous)) => {
                let _ = state.graph.identify(anonymous, user, seq, event.timestamp);
            }
            (EventType::Alias, Some(previous)) => {
                let _ = state.graph.alias(previous, user, seq, event.timestamp, seq % 2 == 0);
            }
            _ => {}
        }
    }
    let _ = state.onboarding.apply_event(seq, &event);
});
