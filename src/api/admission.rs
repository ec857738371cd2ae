//! Per-client bounds: how many connections one client address may hold open, and how many
//! of its requests may be in progress at once.
//!
//! The global bound on concurrent requests protects the server; these protect the other
//! clients from one of them. Without them a single address could hold every connection or
//! every request place (slow bodies, many sockets) and turn everyone else away. A client is its
//! IP address: behind a proxy every request shares the proxy's, so the bounds are generous.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::config::IngestSettings;

/// What each client address holds now.
pub struct Clients {
    held: Mutex<HashMap<IpAddr, Held>>,
    max_connections: usize,
    max_requests: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Held {
    connections: usize,
    requests: usize,
}

/// Which count a [`ClientSlot`] takes part of.
#[derive(Debug, Clone, Copy)]
enum Slot {
    Connection,
    Request,
}

/// A place of one client, given back when dropped.
pub struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
    slot: Slot,
}

impl Clients {
    /// The bounds of the `ingest` config (`maxConnectionsPerClient`, `maxRequestsPerClient`).
    pub fn new(settings: &IngestSettings) -> Arc<Self> {
        Arc::new(Self {
            held: Mutex::new(HashMap::new()),
            max_connections: settings.max_connections_per_client,
            max_requests: settings.max_requests_per_client,
        })
    }

    /// Most requests of one client in progress.
    pub fn max_requests(&self) -> usize {
        self.max_requests
    }

    /// A connection place for `ip`, or `None` when it holds its bound already.
    pub fn connect(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        self.take(ip, Slot::Connection)
    }

    /// A request place for `ip`, or `None` when it has its bound in progress already.
    pub fn begin_request(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        self.take(ip, Slot::Request)
    }

    fn take(self: &Arc<Self>, ip: IpAddr, slot: Slot) -> Option<ClientSlot> {
        let mut held = self.lock();
        let entry = held.entry(ip).or_default();
        let (count, max) = match slot {
            Slot::Connection => (&mut entry.connections, self.max_connections),
            Slot::Request => (&mut entry.requests, self.max_requests),
        };
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(ClientSlot {
            clients: self.clone(),
            ip,
            slot,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, Held>> {
        // The map holds plain counts: a panic elsewhere cannot leave it half-updated.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut held = self.clients.lock();
        if let Some(entry) = held.get_mut(&self.ip) {
            match self.slot {
                Slot::Connection => entry.connections = entry.connections.saturating_sub(1),
                Slot::Request => entry.requests = entry.requests.saturating_sub(1),
            }
            if entry.connections == 0 && entry.requests == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_client_has_its_own_bound_and_gets_its_places_back() {
        let settings = IngestSettings {
            max_connections_per_client: 2,
            max_requests_per_client: 1,
            ..IngestSettings::default()
        };
        let clients = Clients::new(&settings);
        let greedy: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let first = clients.connect(greedy);
        let second = clients.connect(greedy);
        assert!(first.is_some() && second.is_some());
        assert!(
            clients.connect(greedy).is_none(),
            "a third connection is refused"
        );
        assert!(clients.connect(other).is_some(), "another client is not");
        let request = clients.begin_request(greedy);
        assert!(request.is_some());
        assert!(clients.begin_request(greedy).is_none());
        drop((first, request));
        assert!(clients.connect(greedy).is_some());
        assert!(clients.begin_request(greedy).is_some());
        drop(second);
        assert!(
            clients.lock().is_empty(),
            "nothing is kept for idle clients"
        );
    }
}
