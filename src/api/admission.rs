//! Per-client bounds: how many connections one client address may hold open, and how many
//! of its requests may be in progress at once.
//!
//! The global bound on concurrent requests protects the server; these protect the other
//! clients from one of them. Without them a single address could hold every connection or
//! every request place (slow bodies, many sockets) and turn everyone else away. A client is its
//! IPv4 address, or its IPv6 /64 (a host picks any address of its /64 at will, so one IPv6
//! client would otherwise be unbounded): behind a proxy every request shares the proxy's, so
//! the bounds are generous. A bound on all connections caps what many addresses can hold.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::config::IngestSettings;

/// What each client address holds now.
pub struct Clients {
    held: Mutex<Table>,
    max_connections: usize,
    max_requests: usize,
    max_total: usize,
}

/// Each client's places, and the connections of all.
#[derive(Default)]
struct Table {
    clients: HashMap<IpAddr, Held>,
    connections: usize,
}

/// The client an address belongs to: IPv4 as is (IPv4-mapped IPv6 too), IPv6 by its /64.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
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
            held: Mutex::new(Table::default()),
            max_connections: settings.max_connections_per_client,
            max_requests: settings.max_requests_per_client,
            max_total: settings.max_connections,
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
        let ip = client_of(ip);
        let mut held = self.lock();
        if matches!(slot, Slot::Connection) && held.connections >= self.max_total {
            return None;
        }
        let entry = held.clients.entry(ip).or_default();
        let (count, max) = match slot {
            Slot::Connection => (&mut entry.connections, self.max_connections),
            Slot::Request => (&mut entry.requests, self.max_requests),
        };
        if *count >= max {
            return None;
        }
        *count += 1;
        if matches!(slot, Slot::Connection) {
            held.connections += 1;
        }
        Some(ClientSlot {
            clients: self.clone(),
            ip,
            slot,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The map holds plain counts: a panic elsewhere cannot leave it half-updated.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut held = self.clients.lock();
        if matches!(self.slot, Slot::Connection) {
            held.connections = held.connections.saturating_sub(1);
        }
        if let Some(entry) = held.clients.get_mut(&self.ip) {
            match self.slot {
                Slot::Connection => entry.connections = entry.connections.saturating_sub(1),
                Slot::Request => entry.requests = entry.requests.saturating_sub(1),
            }
            if entry.connections == 0 && entry.requests == 0 {
                held.clients.remove(&self.ip);
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
            clients.lock().clients.is_empty(),
            "nothing is kept for idle clients"
        );
    }

    #[test]
    fn an_ipv6_host_is_one_client_and_all_connections_are_bounded() {
        let settings = IngestSettings {
            max_connections_per_client: 2,
            max_connections: 3,
            ..IngestSettings::default()
        };
        let clients = Clients::new(&settings);
        let host = |last: u16| -> IpAddr {
            std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last).into()
        };
        let held: Vec<_> = (1..=2).map(|i| clients.connect(host(i))).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(
            clients.connect(host(3)).is_none(),
            "another address of the same /64 is the same client"
        );
        let elsewhere: IpAddr = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 2, 0, 0, 0, 1).into();
        let third = clients.connect(elsewhere);
        assert!(third.is_some());
        assert!(
            clients.connect([10, 0, 0, 9].into()).is_none(),
            "past maxConnections in all, nobody new connects"
        );
        drop(third);
        assert!(clients.connect([10, 0, 0, 9].into()).is_some());
    }
}
