//! Fault injection: which calls fail and how, drawn from a seeded generator so a run with
//! the same seed fails the same calls. A fault strikes either before the call is processed
//! (500, 429) or after it (a late answer, a hang-up): the second kind is what makes a client
//! retry something the provider already counted.

use std::time::Duration;

use super::http::{Answer, Outcome};

/// How long the "timeout" fault keeps the answer back (the sink gives up after 500 ms).
const STALL: Duration = Duration::from_secs(3);

/// Injected failures on `POST /v1/billing/meter_events` and `POST /hook`.
#[derive(Debug, Clone, Copy)]
pub struct Faults {
    /// Probability (0..=1) that a call fails in one of the four ways.
    pub rate: f64,
    /// Seed of the generator that picks which calls fail and how.
    pub seed: u64,
}

impl Faults {
    /// Every call succeeds.
    pub fn none() -> Self {
        Self { rate: 0.0, seed: 1 }
    }
}

/// One way a call can go wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// 500 before anything is processed.
    ServerError,
    /// 429 with `Retry-After: 1` before anything is processed.
    RateLimited,
    /// Processed, then the answer comes after the client has given up.
    Timeout,
    /// Processed, then the connection is closed without an answer.
    Hangup,
}

/// The fault generator and its count, part of the fake's state.
#[derive(Debug, Default)]
pub(super) struct FaultDice {
    /// Probability (0..=1) that a call fails; changed by `FakeStripe::set_fault_rate`.
    pub(super) rate: f64,
    rng: u64,
    /// How many calls got a fault.
    pub(super) injected: u64,
}

impl FaultDice {
    pub(super) fn new(faults: Faults) -> Self {
        Self {
            rate: faults.rate,
            rng: if faults.seed == 0 {
                0x9E37_79B9_7F4A_7C15
            } else {
                faults.seed
            },
            injected: 0,
        }
    }

    /// xorshift64: deterministic for a seed, good enough to spread faults.
    fn next_u64(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// Decides whether the next call fails, and how.
    pub(super) fn roll(&mut self) -> Option<Fault> {
        if self.rate <= 0.0 {
            return None;
        }
        let draw = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        if draw >= self.rate {
            return None;
        }
        self.injected += 1;
        Some(
            [
                Fault::ServerError,
                Fault::RateLimited,
                Fault::Timeout,
                Fault::Hangup,
            ][(self.next_u64() % 4) as usize],
        )
    }
}

/// The answer for a fault that strikes before processing.
pub(super) fn early_fault(fault: Option<Fault>) -> Option<Answer> {
    match fault {
        Some(Fault::ServerError) => Some(Answer::error(
            500,
            "api_error",
            None,
            None,
            "An unknown error occurred (injected).",
        )),
        Some(Fault::RateLimited) => {
            let mut answer = Answer::error(
                429,
                "invalid_request_error",
                Some("rate_limit"),
                None,
                "Too many requests hit the API too quickly (injected).",
            );
            answer.headers.push(("retry-after", "1".into()));
            Some(answer)
        }
        _ => None,
    }
}

/// Delivers a processed answer the way the fault says.
pub(super) async fn late_fault(fault: Option<Fault>, answer: Answer) -> Outcome {
    match fault {
        Some(Fault::Hangup) => Outcome::Hangup,
        Some(Fault::Timeout) => {
            tokio::time::sleep(STALL).await;
            Outcome::Answer(answer)
        }
        _ => Outcome::Answer(answer),
    }
}
